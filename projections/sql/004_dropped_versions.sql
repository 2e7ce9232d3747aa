-- A dropped version keeps its row: version numbers are never reused, so a new version
-- never inherits the consumer group offsets of an old one with the same number.
ALTER TABLE projection_versions DROP CONSTRAINT IF EXISTS projection_versions_state_check;
ALTER TABLE projection_versions ADD CONSTRAINT projection_versions_state_check
    CHECK (state IN ('building', 'live', 'retired', 'failed', 'dropped'));

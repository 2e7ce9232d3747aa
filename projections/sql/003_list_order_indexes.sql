-- Unfiltered lists page by (created_at, id) / (opened_at, id): index them in version 1
-- (versions built by a rebuild get these from the projection's own DDL).
DO $$
BEGIN
    IF to_regclass('datasets_v1') IS NOT NULL THEN
        CREATE INDEX IF NOT EXISTS datasets_v1_created ON datasets_v1 (created_at, id);
    END IF;
    IF to_regclass('incidents_v1') IS NOT NULL THEN
        CREATE INDEX IF NOT EXISTS incidents_v1_opened ON incidents_v1 (opened_at, id);
    END IF;
END $$;

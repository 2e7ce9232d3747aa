-- Versions of a projection: readers see the live one; a rebuild fills the next one
-- beside it and swaps it in; the previous live one is kept (retired) for rollback.
-- Positions and counters are per version.

ALTER TABLE projection_positions ADD COLUMN IF NOT EXISTS version int NOT NULL DEFAULT 1;
ALTER TABLE projection_positions DROP CONSTRAINT IF EXISTS projection_positions_pkey;
ALTER TABLE projection_positions ADD PRIMARY KEY (projection, version, topic, partition);

ALTER TABLE projection_stats ADD COLUMN IF NOT EXISTS version int NOT NULL DEFAULT 1;
ALTER TABLE projection_stats DROP CONSTRAINT IF EXISTS projection_stats_pkey;
ALTER TABLE projection_stats ADD PRIMARY KEY (projection, version);

CREATE TABLE IF NOT EXISTS projection_versions (
    projection   text        NOT NULL,
    version      int         NOT NULL,
    state        text        NOT NULL CHECK (state IN ('building', 'live', 'retired', 'failed')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    live_since   timestamptz,
    retired_at   timestamptz,
    total        bigint,          -- events to replay, when the rebuild started
    done         bigint,          -- events replayed so far (progress)
    rate         double precision, -- events/s over the last interval
    detail       text,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS projection_versions_one_live ON projection_versions (projection)
    WHERE state = 'live';
CREATE UNIQUE INDEX IF NOT EXISTS projection_versions_one_building ON projection_versions (projection)
    WHERE state = 'building';

-- Each worker of a projection version says it is alive (a rebuild hands over to them).
CREATE TABLE IF NOT EXISTS projection_workers (
    projection    text        NOT NULL,
    version       int         NOT NULL,
    worker        text        NOT NULL,
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, version, worker)
);

-- The bookkeeping every projection shares. The read models themselves are defined by
-- their projections' code (`Projection.ddl`), and created from it (projections.migrations).
-- Runs inside the projection schema (search_path is set by the migration runner).

CREATE TABLE IF NOT EXISTS projection_positions (
    projection   text        NOT NULL,
    topic        text        NOT NULL,
    partition    int         NOT NULL,
    next_offset  bigint      NOT NULL,
    event_time   timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);

CREATE TABLE IF NOT EXISTS projection_stats (
    projection     text   PRIMARY KEY,
    applied        bigint NOT NULL DEFAULT 0,
    dead_lettered  bigint NOT NULL DEFAULT 0,
    last_error     text
);

-- Read models of version 1 and the bookkeeping every projection shares.
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

CREATE TABLE IF NOT EXISTS datasets_v1 (
    id              uuid        PRIMARY KEY,
    version         int         NOT NULL,
    name            text        NOT NULL,
    description     text        NOT NULL DEFAULT '',
    owner           text        NOT NULL DEFAULT '',
    status          text        NOT NULL DEFAULT 'active',
    tags            text[]      NOT NULL DEFAULT '{}',
    metadata        jsonb       NOT NULL DEFAULT '{}',
    latest_version  text,
    versions        int         NOT NULL DEFAULT 0,
    quality         jsonb       NOT NULL DEFAULT '{"checks": 0, "passed": 0, "metrics": {}}',
    archived_reason text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS datasets_v1_status ON datasets_v1 (status, created_at, id);
CREATE INDEX IF NOT EXISTS datasets_v1_owner ON datasets_v1 (owner, created_at, id);
CREATE INDEX IF NOT EXISTS datasets_v1_tags ON datasets_v1 USING gin (tags);

CREATE TABLE IF NOT EXISTS quality_metrics_v1 (
    dataset_id   uuid             NOT NULL,
    version      int              NOT NULL,
    metric       text             NOT NULL,
    value        double precision NOT NULL,
    threshold    double precision NOT NULL,
    comparator   text             NOT NULL,
    passed       boolean          NOT NULL,
    recorded_at  timestamptz      NOT NULL,
    PRIMARY KEY (dataset_id, version)
);
CREATE INDEX IF NOT EXISTS quality_metrics_v1_metric ON quality_metrics_v1 (dataset_id, metric, recorded_at);

CREATE TABLE IF NOT EXISTS incidents_v1 (
    id           uuid        PRIMARY KEY,
    version      int         NOT NULL,
    title        text        NOT NULL,
    description  text        NOT NULL DEFAULT '',
    priority     text        NOT NULL,
    source       text        NOT NULL DEFAULT '',
    external_id  text        NOT NULL DEFAULT '',
    status       text        NOT NULL,
    assignee     text,
    comments     int         NOT NULL DEFAULT 0,
    opened_at    timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    resolved_at  timestamptz,
    closed_at    timestamptz
);
CREATE INDEX IF NOT EXISTS incidents_v1_status ON incidents_v1 (status, opened_at, id);
CREATE INDEX IF NOT EXISTS incidents_v1_priority ON incidents_v1 (priority, opened_at, id);
CREATE INDEX IF NOT EXISTS incidents_v1_assignee ON incidents_v1 (assignee, opened_at, id);

CREATE TABLE IF NOT EXISTS events_v1 (
    event_id        uuid        PRIMARY KEY,
    topic           text        NOT NULL,
    partition       int         NOT NULL,
    "offset"        bigint      NOT NULL,
    context         text        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    version         int         NOT NULL,
    event_type      text        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    headers         jsonb       NOT NULL,
    payload         jsonb       NOT NULL,
    UNIQUE (aggregate_id, version)
);
CREATE INDEX IF NOT EXISTS events_v1_time ON events_v1 (aggregate_id, occurred_at);

-- Readers use these names; a rebuild swaps what they point at.
CREATE OR REPLACE VIEW datasets AS SELECT * FROM datasets_v1;
CREATE OR REPLACE VIEW quality_metrics AS SELECT * FROM quality_metrics_v1;
CREATE OR REPLACE VIEW incidents AS SELECT * FROM incidents_v1;
CREATE OR REPLACE VIEW events AS SELECT * FROM events_v1;

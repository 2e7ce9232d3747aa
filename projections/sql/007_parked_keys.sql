-- Per-key parking (projections.parking): a key whose record a consumer dead-letters is
-- parked, and that consumer's later records of the key are held here in order (the
-- dead-lettered record first) until an operator retries or skips the dead letter.
CREATE TABLE IF NOT EXISTS parked_keys (
    consumer          text        NOT NULL,
    version           integer     NOT NULL,
    key               text        NOT NULL,
    source_topic      text        NOT NULL,
    source_partition  integer     NOT NULL,
    dlq_partition     integer,
    dlq_offset        bigint,
    error             text        NOT NULL,
    parked_at         timestamptz NOT NULL DEFAULT now(),
    request_id        bigint,
    PRIMARY KEY (consumer, version, key)
);
CREATE INDEX IF NOT EXISTS parked_keys_dead_letter ON parked_keys (consumer, dlq_partition, dlq_offset);
CREATE INDEX IF NOT EXISTS parked_keys_requested ON parked_keys (consumer, version) WHERE request_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS parked_records (
    consumer       text     NOT NULL,
    version        integer  NOT NULL,
    key            text     NOT NULL,
    seq            bigserial,
    topic          text     NOT NULL,
    partition      integer  NOT NULL,
    "offset"       bigint   NOT NULL,
    timestamp_ms   bigint   NOT NULL,
    record_key     bytea,
    value          bytea,
    header_names   text[]   NOT NULL,
    header_values  bytea[]  NOT NULL,
    PRIMARY KEY (consumer, version, topic, partition, "offset")
);
CREATE INDEX IF NOT EXISTS parked_records_key ON parked_records (consumer, version, key, seq);

-- What operators did to dead letters: who asked, what, and how it ended.
CREATE TABLE IF NOT EXISTS dead_letter_actions (
    id             bigserial   PRIMARY KEY,
    consumer       text        NOT NULL,
    version        integer,
    key            text,
    dlq_partition  integer     NOT NULL,
    dlq_offset     bigint      NOT NULL,
    action         text        NOT NULL CHECK (action IN ('retry', 'skip')),
    actor          text        NOT NULL,
    requested_at   timestamptz NOT NULL DEFAULT now(),
    done_at        timestamptz,
    outcome        text        NOT NULL DEFAULT 'pending'
                   CHECK (outcome IN ('pending', 'applied', 'failed', 'parked-again')),
    applied        integer     NOT NULL DEFAULT 0,
    error          text
);
CREATE INDEX IF NOT EXISTS dead_letter_actions_dead_letter
    ON dead_letter_actions (consumer, dlq_partition, dlq_offset);

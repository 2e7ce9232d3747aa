-- API keys (api.auth.keys): stored hashed (argon2id), each of one tenant and one role.
CREATE TABLE IF NOT EXISTS api_keys (
    key_id        text        PRIMARY KEY,
    name          text        NOT NULL,
    tenant        text        NOT NULL,
    role          text        NOT NULL,
    hash          text        NOT NULL,
    created_by    text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    revoked_at    timestamptz,
    last_used_at  timestamptz,
    rotated_from  text,
    replaced_by   text
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant, created_at);

-- The audit trail as admins query it, written from the audit topic (streams.audit).
CREATE TABLE IF NOT EXISTS audit_log (
    id              uuid        PRIMARY KEY,
    at              timestamptz NOT NULL,
    tenant          text        NOT NULL,
    actor           text        NOT NULL,
    credential      text        NOT NULL DEFAULT '',
    method          text        NOT NULL DEFAULT '',
    route           text        NOT NULL DEFAULT '',
    aggregate_id    text        NOT NULL DEFAULT '',
    command_id      text        NOT NULL DEFAULT '',
    outcome         text        NOT NULL,
    status          int         NOT NULL,
    reason          text        NOT NULL DEFAULT '',
    client_ip       text        NOT NULL DEFAULT '',
    user_agent      text        NOT NULL DEFAULT '',
    correlation_id  text        NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audit_log_tenant_at ON audit_log (tenant, at DESC, id);
CREATE INDEX IF NOT EXISTS audit_log_actor ON audit_log (tenant, actor, at DESC);
CREATE INDEX IF NOT EXISTS audit_log_outcome ON audit_log (tenant, outcome, at DESC);

-- The coordinator's tables: saga instances, their append-only log and the
-- transactional outbox. `__SCHEMA__` is replaced by the quoted schema name.

CREATE TABLE __SCHEMA__.sagas (
    saga_id      text        PRIMARY KEY,
    saga_name    text        NOT NULL,
    saga_version integer     NOT NULL,
    status       text        NOT NULL,
    state        jsonb       NOT NULL,  -- the full SagaState document
    wake_at      timestamptz NULL,      -- due time of the pending timer, if any
    version      bigint      NOT NULL,  -- optimistic concurrency token
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);

CREATE INDEX sagas_wake_at_idx ON __SCHEMA__.sagas (wake_at) WHERE wake_at IS NOT NULL;
CREATE INDEX sagas_status_idx ON __SCHEMA__.sagas (status);
CREATE INDEX sagas_name_status_idx ON __SCHEMA__.sagas (saga_name, status);
CREATE INDEX sagas_created_at_idx ON __SCHEMA__.sagas (created_at);

CREATE TABLE __SCHEMA__.saga_log (
    id         bigserial   PRIMARY KEY,
    saga_id    text        NOT NULL,
    at         timestamptz NOT NULL,
    event      text        NOT NULL,
    step       text        NULL,
    step_index integer     NULL,
    kind       text        NULL,
    attempt    integer     NULL,
    detail     jsonb       NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX saga_log_saga_id_idx ON __SCHEMA__.saga_log (saga_id, id);

-- Messages committed with the state that produced them; the relay publishes
-- and deletes them. Claim with FOR UPDATE SKIP LOCKED, never page by id.
CREATE TABLE __SCHEMA__.outbox (
    id            bigserial   PRIMARY KEY,
    saga_id       text        NOT NULL,
    envelope      jsonb       NOT NULL,  -- the envelope, including its `trace`
    publish_after timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX outbox_publish_after_idx ON __SCHEMA__.outbox (publish_after);

-- A participant's inbox: one row per command id it has seen, in the
-- participant's own schema. `__SCHEMA__` is replaced by the quoted schema name.

CREATE TABLE __SCHEMA__.inbox (
    command_id text        PRIMARY KEY,
    status     text        NOT NULL CHECK (status IN ('pending', 'done', 'tombstone')),
    reply      jsonb       NULL,  -- the stored reply envelope (with `trace`) once done
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX inbox_created_at_idx ON __SCHEMA__.inbox (created_at);

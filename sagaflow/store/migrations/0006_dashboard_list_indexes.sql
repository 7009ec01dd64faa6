-- The dashboard's list of sagas (sagaflow.dashboard): newest first, paged by
-- the keyset (created_at, saga_id), with or without a status filter. Each
-- index extends the single-column one it replaces (a prefix serves the old
-- queries, retention's included), so the coordinator's writes maintain no
-- more indexes than before. The plans, on a million sagas: docs/dashboard.md.
CREATE INDEX IF NOT EXISTS sagas_created_id_idx
    ON __SCHEMA__.sagas (created_at, saga_id);
CREATE INDEX IF NOT EXISTS sagas_status_created_id_idx
    ON __SCHEMA__.sagas (status, created_at, saga_id);
DROP INDEX IF EXISTS __SCHEMA__.sagas_created_at_idx;
DROP INDEX IF EXISTS __SCHEMA__.sagas_status_idx;

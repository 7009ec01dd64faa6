-- Retention (`sagaflow db prune`, and the coordinator's prune task) deletes
-- finished sagas whose last change is older than a cutoff, oldest first. This
-- index holds finished sagas only: running ones, which are updated at every
-- step, never enter it, so the hot path pays one index entry per saga, when it
-- finishes. FAILED sagas are not in it: they are few and kept by default (an
-- operator may retry them); their prune uses sagas_status_idx.
--
-- Building it takes a lock that blocks writes to the sagas table while it runs
-- (seconds per few million rows). On a large table, build it beforehand without
-- blocking, under the same name, and this migration finds it there:
--   CREATE INDEX CONCURRENTLY sagas_finished_at_idx ON sagaflow.sagas (updated_at)
--     WHERE status IN ('COMPLETED', 'COMPENSATED', 'CANCELLED');
CREATE INDEX IF NOT EXISTS sagas_finished_at_idx ON __SCHEMA__.sagas (updated_at)
    WHERE status IN ('COMPLETED', 'COMPENSATED', 'CANCELLED');

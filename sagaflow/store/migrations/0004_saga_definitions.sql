-- The definitions sagas run on, by name and version: each one's fingerprint
-- (a hash of its steps, actions, kinds and order) and the shape it hashes, so
-- that a coordinator loading another definition under a recorded name and
-- version refuses to start and can name the difference (docs/concepts.md,
-- "Versions and fingerprints"). The first record of a name and version wins.
-- Each saga's own state document carries the fingerprint it started on too.
CREATE TABLE __SCHEMA__.saga_definitions (
    saga_name    text        NOT NULL,
    saga_version integer     NOT NULL,
    fingerprint  text        NOT NULL,
    shape        jsonb       NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_name, saga_version)
);

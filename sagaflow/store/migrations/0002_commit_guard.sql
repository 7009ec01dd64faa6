-- Used by the one-statement commit (PostgresSagaStore.commit), which runs
-- without an explicit transaction: when fewer sagas were saved than the
-- statement meant to save (another writer moved one), it raises a
-- serialization failure, so the whole statement, and with it every row it
-- wrote, is rolled back.
CREATE FUNCTION __SCHEMA__.expect_saved(saved bigint, expected integer) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF saved <> expected THEN
        RAISE EXCEPTION 'sagas no longer at the version they were loaded at (% of % saved)',
            saved, expected
            USING ERRCODE = '40001';
    END IF;
    RETURN saved;
END
$$;

"""The fault injection itself, in memory (seconds, no processes): the switches do what
the scenarios count on."""

from __future__ import annotations

import pytest

from sagaflow.core.messages import Envelope, MessageKind
from sagaflow.store import InMemoryParticipantStore
from tests.faults.injection import KillAfterCommit, Poison, PoisonedMessage, kill_rule


def test_once_kills_after_the_nth_commit_only() -> None:
    rule = kill_rule("once:3")
    assert [rule(n) for n in range(1, 6)] == [False, False, True, False, False]


@pytest.mark.parametrize(("spec", "expected"), [("1", 4), ("1.0", 4), ("0", 0), ("0.5", 2)])
def test_a_probability_per_commit(spec: str, expected: int) -> None:
    draws = iter([0.1, 0.9, 0.2, 0.7])
    rule = kill_rule(spec, rng=lambda: next(draws))
    assert sum(rule(n) for n in range(1, 5)) == expected


@pytest.mark.parametrize("spec", ["2", "-0.1", "once:0", "once:x", "sometimes"])
def test_nonsense_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="FAULTS_KILL_AFTER_COMMIT"):
        kill_rule(spec)


async def test_the_kill_comes_after_a_command_commits_never_after_setup_or_a_rollback() -> None:
    kills: list[int] = []
    store = KillAfterCommit(
        InMemoryParticipantStore(), lambda n: True, kill=lambda: kills.append(1)
    )
    await store.start()
    async with store.transaction():  # a participant's setup: claims nothing
        pass
    assert kills == []
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.claim(["c-1"])
            raise RuntimeError("rolled back")
    assert kills == []
    async with store.transaction() as tx:
        assert await tx.claim(["c-2"]) == {}
    assert kills == [1] and store.committed == 1
    await store.close()


def _message(saga_id: str) -> Envelope:
    return Envelope(
        message_id=f"{saga_id}:0:command:1",
        command_id=f"{saga_id}:0:command",
        saga_id=saga_id,
        saga_name="s",
        saga_version=1,
        step="reserve",
        step_index=0,
        kind=MessageKind.COMMAND,
        attempt=1,
        type="inventory.reserve",
        payload={},
    )


def test_the_poison_hits_one_saga_until_its_message_is_dead_lettered() -> None:
    poison = Poison("s-1")
    with poison.processing(_message("s-2"), "q") as trace:
        assert trace == {}
    for _ in range(2):
        with pytest.raises(PoisonedMessage), poison.processing(_message("s-1"), "q"):
            pass
    poison.dead_lettered("q", "unhandled: PoisonedMessage: poisoned message of saga s-10 on q")
    assert not poison.spent
    poison.dead_lettered("q", "unhandled: PoisonedMessage: poisoned message of saga s-1 on q")
    assert poison.spent and poison.raised == 2
    with poison.processing(_message("s-1"), "q"):
        pass

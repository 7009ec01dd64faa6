"""The errors sagaflow raises.

Every error derives from one root::

    SagaflowError
    ├── ConfigurationError        a setting or a definition is wrong
    │   ├── DefinitionError       a saga or participant declaration is invalid
    │   ├── NotReachable          at start, a server did not answer in time
    │   └── NoConnection          a handler asked for a connection the in-memory store has not
    ├── TransportError            the broker refused or lost a publish / connection
    ├── StoreError                the database failed
    │   └── ConcurrencyConflict   another process changed the same saga
    ├── MessageRejected           a message cannot be parsed, validated or routed
    └── SagaError                 about one saga (carries saga id, step, attempt)
        ├── StepFailed            a participant reported a business failure
        ├── CompensationFailed    a compensation exhausted its retries
        └── StepTimedOut          a step exhausted its attempts by timing out

``BusinessFailure`` is not an error of the framework: participant handlers raise
it to say "no" (the saga compensates). Any other exception a handler raises is
transient and is retried by the step's policy.
"""

from __future__ import annotations


class SagaflowError(Exception):
    """Root of every error sagaflow raises."""


class ConfigurationError(SagaflowError):
    """A setting is missing or invalid."""


class DefinitionError(ConfigurationError):
    """A saga or participant declaration is invalid; raised at registration."""


class NoConnection(ConfigurationError):
    """A handler asked ``ctx.connection`` of a worker on the in-memory participant
    store, which has no database: test it with a database, or check
    ``ctx.has_connection`` first."""


class NotReachable(ConfigurationError):
    """At start, the database or the broker still failed when the start-up
    deadline passed: a wrong host or port, or a server that is down.

    Retrying what heals has a bound at start: a process that never got going
    has nothing to keep alive, and its supervisor should hear about it.

    Attributes:
        seconds: How long start-up tried.
    """

    def __init__(self, message: str, *, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds


class TransportError(SagaflowError):
    """The broker could not take or deliver a message."""


class StoreError(SagaflowError):
    """The database failed."""


class ConcurrencyConflict(StoreError):
    """Another process changed the same saga concurrently."""


class MessageRejected(SagaflowError):
    """A message cannot be parsed, validated, or routed; it is dead-lettered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SagaError(SagaflowError):
    """An error about one saga instance."""

    def __init__(
        self,
        message: str,
        *,
        saga_id: str,
        step: str | None = None,
        attempt: int | None = None,
    ) -> None:
        super().__init__(message)
        self.saga_id = saga_id
        self.step = step
        self.attempt = attempt


class StepFailed(SagaError):
    """A participant reported a business failure for a step."""


class CompensationFailed(SagaError):
    """A compensation exhausted its retries; the saga needs an operator."""


class StepTimedOut(SagaError):
    """A step exhausted its attempts by timing out."""


class BusinessFailure(Exception):
    """Raised by a participant handler to refuse a command; the saga compensates.

    Args:
        reason: A short, stable, human-readable reason ("out_of_stock").
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

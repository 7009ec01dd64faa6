"""sagaflow: orchestrated sagas for Python services over RabbitMQ and PostgreSQL.

The public API is what ``__all__`` lists; adapters live in ``sagaflow.transport``
and ``sagaflow.store``, the test harness in ``sagaflow.testing``.
"""

from importlib import metadata as _metadata

from sagaflow.core.definition import Action, Group, RetryPolicy, Saga, Step, Wait
from sagaflow.core.errors import (
    BusinessFailure,
    ConcurrencyConflict,
    ConfigurationError,
    DefinitionError,
    MessageRejected,
    SagaflowError,
    StoreError,
    TransportError,
)
from sagaflow.core.state import SagaState, SagaStatus
from sagaflow.runtime.client import SagaClient, SagaHandle, SagaView
from sagaflow.runtime.coordinator import Coordinator
from sagaflow.runtime.hooks import Hooks
from sagaflow.runtime.participant import HandlerContext, Participant, Worker

__all__ = [
    "Action",
    "BusinessFailure",
    "ConcurrencyConflict",
    "ConfigurationError",
    "Coordinator",
    "DefinitionError",
    "Group",
    "HandlerContext",
    "Hooks",
    "MessageRejected",
    "Participant",
    "RetryPolicy",
    "Saga",
    "SagaClient",
    "SagaHandle",
    "SagaState",
    "SagaStatus",
    "SagaView",
    "SagaflowError",
    "Step",
    "StoreError",
    "TransportError",
    "Wait",
    "Worker",
]

try:
    __version__ = _metadata.version("sagaflow")  # pyproject.toml is the one source
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

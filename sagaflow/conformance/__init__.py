"""The conformance kit: black-box checks of a running participant, in any language.

``sagaflow participant-check`` talks to a participant only through the broker,
as the coordinator does, and checks each obligation of ``docs/protocol.md``:

- ``reply``: every action is answered, with the documented fields, properties
  and headers, and a success payload valid for the action's reply schema;
- ``duplicate``: the same command again, and a later attempt of it, get the
  stored reply (same ``message_id`` and ``attempt`` as the first);
- ``redelivery``: copies arriving together (one marked redelivered, as a
  quorum queue does) are all answered alike;
- ``effects-once``: after all those copies, the user's SQL query counts one
  effect (``$1`` is the key the kit put in the command);
- ``compensation``: a compensation after its command succeeds, twice alike;
- ``tombstone``: a compensation before its command is answered ``success``,
  and the late command is never answered nor applied;
- ``dead-letter <code>``: each kind of hostile message is dead-lettered with
  its documented reason (``x-sagaflow-reason``) and never answered, and the
  participant goes on answering afterwards.

It consumes the replies queue, so run it where no coordinator does (a vhost
or ``SAGAFLOW_PREFIX`` of its own), and it watches the dead-letter exchange
with a queue of its own; its hostile messages stay in the dead-letter queue.
"""

from sagaflow.conformance.kit import run_checks
from sagaflow.conformance.model import Check, KitStep, Result, steps_of

__all__ = ["Check", "KitStep", "Result", "run_checks", "steps_of"]

"""A small saga used by unit tests: three compensatable steps, a pivot, a retriable step."""

from __future__ import annotations

from pydantic import BaseModel

from sagaflow import Action, RetryPolicy, Saga, Step


class Data(BaseModel):
    order_id: str
    amount: int = 10
    reservation: str | None = None


class Cmd(BaseModel):
    order_id: str
    amount: int = 0


class Ok(BaseModel):
    ref: str = "ok"


reserve = Action("inventory", "reserve", Cmd, Ok)
release = Action("inventory", "release", Cmd, Ok)
charge = Action("payment", "charge", Cmd, Ok)
refund = Action("payment", "refund", Cmd, Ok)
schedule = Action("shipping", "schedule", Cmd, Ok)
cancel = Action("shipping", "cancel", Cmd, Ok)
confirm = Action("order", "confirm", Cmd, Ok)
approve = Action("order", "approve", Cmd, Ok)

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=1.0)
COMP = RetryPolicy(max_attempts=4, initial_backoff=0.1, max_backoff=1.0)


def _cmd(d: Data) -> Cmd:
    return Cmd(order_id=d.order_id, amount=d.amount)


def _keep(d: Data, r: Ok) -> Data:
    return d.model_copy(update={"reservation": r.ref})


saga = Saga(
    "sample",
    data=Data,
    steps=[
        Step(
            "reserve",
            reserve,
            _cmd,
            compensation=release,
            on_reply=_keep,
            retry=FAST,
            compensation_retry=COMP,
            timeout=5,
        ),
        Step(
            "charge",
            charge,
            _cmd,
            compensation=refund,
            retry=FAST,
            compensation_retry=COMP,
            timeout=5,
        ),
        Step(
            "schedule",
            schedule,
            _cmd,
            compensation=cancel,
            retry=FAST,
            compensation_retry=COMP,
            timeout=5,
        ),
        Step("confirm", confirm, _cmd, retry=FAST, timeout=5),
        Step("approve", approve, _cmd, retriable=True, retry=FAST, timeout=5),
    ],
)

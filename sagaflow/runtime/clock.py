"""The real clock and id factory (the fake ones live in ``sagaflow.testing``)."""

from __future__ import annotations

import asyncio
import time
import uuid


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class UUIDFactory:
    def new_saga_id(self) -> str:
        return str(uuid.uuid4())

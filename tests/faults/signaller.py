"""A process that approves orders: ``python -m tests.faults.signaller NAME FILE``.

Reads saga ids (one a line) from FILE and sends each the signal ``approval``
twice, as manager NAME, through its own ``SagaClient`` on the database of
``SAGAFLOW_DATABASE_URL``; several of these run at once in the signal
scenarios. Prints one JSON line: how many signals were applied or kept, and
how many were refused (a saga that had already ended, say) by reason.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter
from pathlib import Path

import orjson

from sagaflow import SagaClient, SagaflowError
from sagaflow.config import Settings
from sagaflow.examples.shop.contracts import ManagerApproval
from sagaflow.store import PostgresSagaStore
from services.order.saga import create_order


async def main(name: str, ids: list[str]) -> None:
    random.Random(name).shuffle(ids)
    settings = Settings()
    store = PostgresSagaStore(settings.database_url, schema=settings.db_schema, max_size=4)
    await store.start()
    client = SagaClient([create_order], store=store)
    counts: Counter[str] = Counter()
    gate = asyncio.Semaphore(4)

    async def approve(saga_id: str) -> None:
        async with gate:
            for attempt in range(2):
                while True:
                    try:
                        await client.signal_saga(
                            saga_id,
                            "approval",
                            ManagerApproval(approved_by=name),
                            by=name,
                            reason=f"attempt {attempt + 1}",
                        )
                        counts["sent"] += 1
                        break
                    except SagaflowError as exc:
                        if "store" in type(exc).__name__.lower():  # healing: the database
                            await asyncio.sleep(0.2)
                            continue
                        counts[str(exc).split(":")[0]] += 1
                        break

    try:
        await asyncio.gather(*(approve(saga_id) for saga_id in ids))
    finally:
        await store.close()
    sys.stdout.write(orjson.dumps(dict(counts)).decode() + "\n")


if __name__ == "__main__":
    lines = Path(sys.argv[2]).read_text(encoding="utf-8").splitlines()
    asyncio.run(main(sys.argv[1], [line.strip() for line in lines if line.strip()]))

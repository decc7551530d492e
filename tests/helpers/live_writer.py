"""An application writing to a store (SQLite or Postgres) while the worker sweeps it.

Run as a process: `python live_writer.py STORE SECONDS OUT.json THREAD...`, STORE a
SQLite file or a `postgresql://` DSN. It runs chat turns through the real
`AsyncSqliteSaver` or `AsyncPostgresSaver` round-robin over the given threads until
SECONDS pass, and records per thread the turns it completed, every error, and each
turn's latency and wall-clock end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from worker.service.demo import chat_graph, thread


def saver_on(store: str) -> contextlib.AbstractAsyncContextManager[BaseCheckpointSaver[Any]]:
    """The application's saver on `store` (its tables exist: the store was written before)."""
    if store.startswith("postgresql://"):
        # Imported only here: a SQLite-only install has no Postgres saver.
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

        return AsyncPostgresSaver.from_conn_string(store)
    return AsyncSqliteSaver.from_conn_string(store)


async def main(db: str, seconds: float, out: str, threads: list[str]) -> None:
    done: dict[str, int] = {t: 0 for t in threads}
    errors: list[str] = []
    latencies: list[float] = []
    ends: list[float] = []
    async with saver_on(db) as saver:
        app = chat_graph(saver)
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            tid = threads[i % len(threads)]
            i += 1
            t0 = time.monotonic()
            try:
                await app.ainvoke({"messages": [f"live {done[tid]}"]}, thread(tid))
                done[tid] += 1
            except Exception as e:  # recorded: the test asserts there are none
                errors.append(f"{type(e).__name__}: {e}")
            latencies.append(time.monotonic() - t0)
            ends.append(time.time())
            await asyncio.sleep(0.01)
    with open(out, "w") as f:
        json.dump({"done": done, "errors": errors, "latencies": latencies, "ends": ends}, f)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4:]))

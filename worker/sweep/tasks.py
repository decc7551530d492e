"""Ending the background work a sweep starts beside itself.

A pass reads ahead (the planner's next pages, the thread count behind the
safety limit) in tasks of its own; when the pass ends early (stopped, failed,
cancelled) those must end with it, not run on against a store being closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel `tasks` and wait until each has ended. Their outcomes are dropped: the
    caller is already ending for a reason of its own, which is the one that counts."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

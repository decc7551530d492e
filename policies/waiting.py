"""Whether a thread waits for input, read from its newest root checkpoint.

A thread waits when its state's `next` is not empty: paused at `interrupt()`,
at a static `interrupt_before`/`interrupt_after` breakpoint, or stopped by an
error. A static breakpoint leaves no `__interrupt__` write, so the writes alone
cannot tell; the pending tasks can. Without the graph we read them from the
trigger channels: LangGraph (>= 0.3) starts a node when its `branch:to:<node>`
(or `join:...:<node>`, or `__start__`) channel holds a value the node has not
seen, and consumes the value when the node finishes, so a finished thread
holds none. Pending `Send`s sit in `__pregel_tasks`.

Only the writes' channel names are readable without decoding (they stay
plain text under `EncryptedSerializer`): an `interrupt()` pause or an error
shows there, a static breakpoint or a deferred node's pause does not, and a
finished run's head looks the same from outside (no writes, `source: loop`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

INTERRUPT = "__interrupt__"
ERROR = "__error__"
TASKS = "__pregel_tasks"
START = "__start__"


def _node_of(channel: str) -> str | None:
    """The node a trigger channel starts, or None if the channel is no trigger."""
    if channel == START:
        return START
    if channel.startswith("branch:to:"):
        return channel[len("branch:to:") :]
    if channel.startswith("join:"):
        # join:<a>+<b>:<node>
        return channel.rsplit(":", 1)[-1]
    return None


def _unseen(version: Any, seen: Any) -> bool:
    if seen is None:
        return True
    try:
        return bool(version > seen)
    except TypeError:
        # Versions of mixed types cannot be ordered: count the task as pending,
        # which only ever keeps a thread.
        return True


def writes_show_waiting(write_channels: Iterable[str]) -> bool:
    """Whether a checkpoint's pending writes alone prove the thread waits.

    An `__interrupt__` or `__error__` write does; their absence proves nothing.
    """
    return any(ch in (INTERRUPT, ERROR) for ch in write_channels)


def is_waiting(checkpoint: Mapping[str, Any], write_channels: Iterable[str]) -> bool:
    """Whether the thread at this checkpoint has tasks left to run.

    `checkpoint` is the decoded checkpoint (`channel_values`, `channel_versions`,
    `versions_seen`); `write_channels` the channels of its pending writes.
    """
    if writes_show_waiting(write_channels):
        return True
    values: Mapping[str, Any] = checkpoint.get("channel_values") or {}
    versions: Mapping[str, Any] = checkpoint.get("channel_versions") or {}
    seen_by: Mapping[str, Mapping[str, Any]] = checkpoint.get("versions_seen") or {}
    if values.get(TASKS):
        return True
    for channel in values:
        node = _node_of(channel)
        if node is None:
            continue
        if _unseen(versions.get(channel), (seen_by.get(node) or {}).get(channel)):
            return True
    return False

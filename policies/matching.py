"""First-match-wins selection of the policy that governs a (thread, namespace).

Globs are `fnmatchcase` on the whole string: case-sensitive on every platform,
because thread ids are tenant keys and `User-1` is not `user-1`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from policies.config import Match, Policy


def matches(match: Match, thread_id: str, namespace: str, metadata: Mapping[str, Any]) -> bool:
    """Whether `match` selects this thread and namespace. An absent key matches everything."""
    if match.thread_id is not None and not any(
        fnmatchcase(thread_id, glob) for glob in match.thread_id
    ):
        return False
    if match.checkpoint_ns is not None and not fnmatchcase(namespace, match.checkpoint_ns):
        return False
    if match.metadata:
        for key, want in match.metadata.items():
            if key not in metadata or not _same_value(metadata[key], want):
                return False
    return True


def _same_value(have: Any, want: Any) -> bool:
    # YAML `true` must not equal metadata `1`: Python's True == 1 would say it does.
    return (type(have) is type(want) and bool(have == want)) or (
        isinstance(have, int | float)
        and isinstance(want, int | float)
        and not isinstance(have, bool)
        and not isinstance(want, bool)
        and have == want
    )


class Ruleset:
    """The ordered policies that apply to one store."""

    def __init__(self, policies: Sequence[Policy]) -> None:
        self.policies: tuple[Policy, ...] = tuple(policies)

    def first_match(
        self, thread_id: str, namespace: str, metadata: Mapping[str, Any]
    ) -> Policy | None:
        """The policy governing (thread, namespace): the first in file order that matches."""
        for policy in self.policies:
            if matches(policy.match, thread_id, namespace, metadata):
                return policy
        return None

    def could_match_thread(self, thread_id: str) -> bool:
        """Whether any policy might govern some namespace of this thread (a cheap pre-filter)."""
        return any(
            p.match.thread_id is None or any(fnmatchcase(thread_id, g) for g in p.match.thread_id)
            for p in self.policies
        )

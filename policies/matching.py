"""First-match-wins selection of the policy that governs a (thread, namespace).

Globs are `fnmatchcase` on the whole string: case-sensitive on every platform,
because thread ids are tenant keys and `User-1` is not `user-1`.

An `orphaned` policy also needs to know which threads the application still
lists. The shell asks its registry, one page of thread ids at a time, and
hands the answer in (`Ruleset.for_page`); this module decides. A policy whose
registry gave no answer matches nothing: an unanswered registry must never
read as "every thread is orphaned".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
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
    """The ordered policies that apply to one store.

    `known`: per `orphaned` policy name, the thread ids (of the page being
    decided) its registry still lists. A policy absent from it has no answer
    and matches nothing.
    """

    def __init__(
        self, policies: Sequence[Policy], known: Mapping[str, Set[str]] | None = None
    ) -> None:
        self.policies: tuple[Policy, ...] = tuple(policies)
        self.known: Mapping[str, Set[str]] = known or {}
        self.has_orphan_policies = any(p.orphaned is not None for p in self.policies)

    def for_page(self, known: Mapping[str, Set[str]]) -> Ruleset:
        """These policies, with the registries' answers for one page of thread ids."""
        return Ruleset(self.policies, known)

    def orphaned(self, policy: Policy, thread_id: str) -> bool:
        """Whether `policy` may govern `thread_id` as far as its registry goes.

        True for a policy without `orphaned`; for one with it, only when its
        registry answered and does not list the thread.
        """
        if policy.orphaned is None:
            return True
        known = self.known.get(policy.name)
        return known is not None and thread_id not in known

    def first_match(
        self, thread_id: str, namespace: str, metadata: Mapping[str, Any]
    ) -> Policy | None:
        """The policy governing (thread, namespace): the first in file order that matches."""
        for policy in self.policies:
            if matches(policy.match, thread_id, namespace, metadata) and self.orphaned(
                policy, thread_id
            ):
                return policy
        return None

    def unreconciled(self, thread_id: str, metadata: Mapping[str, Any]) -> Policy | None:
        """The `orphaned` policy without a registry answer that would come first for the
        thread's root namespace, were it answered; None when there is none.

        Its registry failed, so the thread fell through to a later policy (or
        to none): what the sweep reports as skipped.
        """
        for policy in self.policies:
            if not matches(policy.match, thread_id, "", metadata):
                continue
            if policy.orphaned is not None and policy.name not in self.known:
                return policy
            if self.orphaned(policy, thread_id):
                return None
        return None

    def could_match_thread(self, thread_id: str, among: Set[str] | None = None) -> bool:
        """Whether any policy might govern some namespace of this thread (a cheap pre-filter).

        `among`: only the policies of these names count (None: every policy).
        """
        return any(
            (among is None or p.name in among)
            and (
                p.match.thread_id is None
                or any(fnmatchcase(thread_id, g) for g in p.match.thread_id)
            )
            for p in self.policies
        )

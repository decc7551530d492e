"""`stats`: checkpoint ages per namespace, the same for every engine."""

from __future__ import annotations

from policies.ids import checkpoint_time

AGE_BUCKETS = (
    ("<1h", 3600.0),
    ("<1d", 86400.0),
    ("<7d", 7 * 86400.0),
    ("<30d", 30 * 86400.0),
    ("<90d", 90 * 86400.0),
    (">=90d", float("inf")),
)
UNKNOWN_AGE = "unknown"
"""The bucket of a checkpoint whose id carries no time."""
_BUCKET_ORDER = {name: i for i, (name, _) in enumerate((*AGE_BUCKETS, (UNKNOWN_AGE, 0.0)))}


def namespace_label(namespace: str) -> str:
    """Namespaces grouped for reporting: subgraph calls by node, task ids dropped.

    The root graph's namespace stays `""`; a table shows it as `""` (`namespace_display`).
    """
    if namespace == "":
        return ""
    return "|".join(
        seg.split(":", 1)[0] + (":*" if ":" in seg else "") for seg in namespace.split("|")
    )


def namespace_display(label: str) -> str:
    """A namespace label for a table, where an empty cell would be invisible."""
    return label if label else '""'


class AgeHistogram:
    """Checkpoints counted per namespace label and age bucket."""

    def __init__(self, now: float) -> None:
        self.now = now
        self._counts: dict[str, dict[str, int]] = {}

    def add(self, namespace: str, checkpoint_id: str) -> None:
        """Count one checkpoint."""
        t = checkpoint_time(checkpoint_id)
        if t is None:
            bucket = UNKNOWN_AGE
        else:
            age = self.now - t
            bucket = next(name for name, limit in AGE_BUCKETS if age < limit)
        per_ns = self._counts.setdefault(namespace_label(namespace), {})
        per_ns[bucket] = per_ns.get(bucket, 0) + 1

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Namespace label -> bucket -> checkpoints; labels sorted, buckets youngest first.

        Rows arrive in storage order, so the buckets are ordered here, not as first seen.
        """
        return {
            ns: dict(sorted(buckets.items(), key=lambda item: _BUCKET_ORDER[item[0]]))
            for ns, buckets in sorted(self._counts.items())
        }

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


def namespace_label(namespace: str) -> str:
    """Namespaces grouped for reporting: subgraph calls by node, task ids dropped."""
    if namespace == "":
        return '""'
    return "|".join(
        seg.split(":", 1)[0] + (":*" if ":" in seg else "") for seg in namespace.split("|")
    )


class AgeHistogram:
    """Checkpoints counted per namespace label and age bucket."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.counts: dict[str, dict[str, int]] = {}

    def add(self, namespace: str, checkpoint_id: str) -> None:
        """Count one checkpoint."""
        t = checkpoint_time(checkpoint_id)
        if t is None:
            bucket = "unknown"
        else:
            age = self.now - t
            bucket = next(name for name, limit in AGE_BUCKETS if age < limit)
        per_ns = self.counts.setdefault(namespace_label(namespace), {})
        per_ns[bucket] = per_ns.get(bucket, 0) + 1

"""Reading serialized checkpoints with LangGraph's own serializer.

The worker decodes as little as it can: the newest root checkpoint of an
expiry candidate (is it waiting?) and the checkpoints of `DeltaChannel`
threads (which ancestors does a replay read?). Without the key of an
encrypted store, deleting a whole thread needs no decoding (`interrupted:
expire`), but with `interrupted: keep` only a head whose writes show an
interrupt or error is known to wait; any other head might be a static
breakpoint, so the thread is kept and counted `undecodable`. Nothing is
trimmed where trimming depends on what the worker cannot read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from langgraph.checkpoint.serde.base import SerializerProtocol
from langgraph.checkpoint.serde.encrypted import EncryptedSerializer
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from policies.summary import ts_seconds
from policies.waiting import is_waiting


class Decoder:
    """Decodes checkpoint blobs; answers None where it cannot (encrypted, no key)."""

    def __init__(self, encryption_key: str | None = None) -> None:
        self.serde: SerializerProtocol
        if encryption_key:
            self.serde = EncryptedSerializer.from_pycryptodome_aes(key=encryption_key.encode())
        else:
            self.serde = JsonPlusSerializer()
        self._encrypted = bool(encryption_key)

    def checkpoint(self, type_: str | None, blob: bytes | None) -> dict[str, Any] | None:
        """The decoded checkpoint, or None if it cannot be read."""
        if type_ is None or blob is None:
            return None
        if "+" in type_ and not self._encrypted:
            return None
        try:
            value = self.serde.loads_typed((type_, blob))
        except Exception:
            # A wrong key, a corrupt row or an unknown type: treated as
            # unreadable, which only ever keeps rows.
            return None
        return value if isinstance(value, dict) else None

    def channel_keys(
        self, type_: str | None, blob: bytes | None
    ) -> tuple[frozenset[str], frozenset[str]] | None:
        """(channel_values keys, channel_versions keys), or None if unreadable."""
        ck = self.checkpoint(type_, blob)
        if ck is None:
            return None
        return (
            frozenset(ck.get("channel_values") or ()),
            frozenset(ck.get("channel_versions") or ()),
        )

    def timestamp(self, type_: str | None, blob: bytes | None) -> float | None:
        """The checkpoint's `ts` as Unix seconds: the age of a checkpoint whose id is not v6."""
        ck = self.checkpoint(type_, blob)
        return ts_seconds(ck.get("ts")) if ck else None

    def waiting(
        self, type_: str | None, blob: bytes | None, write_channels: Iterable[str]
    ) -> bool | None:
        """Whether the thread waits at this checkpoint; None if unreadable."""
        ck = self.checkpoint(type_, blob)
        if ck is None:
            return None
        return is_waiting(ck, write_channels)

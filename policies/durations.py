"""Durations as written in a config: `30s`, `15m`, `12h`, `7d`, `2w`.

Deliberately narrow: one positive integer and one unit, nothing else. A
retention rule that silently read `0`, `-1d` or `1.5d` as something usable
could delete far more than meant, so anything outside the grammar is an
error rather than a best guess.
"""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["UNITS", "format_duration", "parse_duration"]

UNITS: dict[str, int] = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
"""Unit suffix -> seconds, largest first (the order `format_duration` tries them)."""

# ASCII digits only: `\d` would also accept digits of other scripts.
_DURATION = re.compile(r"([0-9]+)([a-zA-Z]*)", re.ASCII)
_EXAMPLES = "30s, 15m, 12h, 7d or 2w"


def parse_duration(text: str) -> timedelta:
    """Parse `<positive integer><unit>` with unit one of s, m, h, d, w.

    Raises ValueError, with a message saying what is wrong and what would be
    accepted, for zero, negative, fractional, unit-less, unknown-unit or
    otherwise unparsable input (including non-strings).
    """
    if not isinstance(text, str):
        raise ValueError(
            f"a duration must be a string such as {_EXAMPLES}, not {type(text).__name__}"
        )
    m = _DURATION.fullmatch(text)
    if m is None:
        raise ValueError(_diagnose(text))
    count_text, unit = m.groups()
    if not unit:
        raise ValueError(
            f"duration {text!r} has no unit: write {count_text}s, {count_text}m, "
            f"{count_text}h, {count_text}d or {count_text}w"
        )
    if unit not in UNITS:
        raise ValueError(
            f"duration {text!r} has an unknown unit {unit!r}: use s, m, h, d or w "
            f"(lower case), e.g. {_EXAMPLES}"
        )
    count = int(count_text)
    if count == 0:
        # Zero must not mean "everything is old": that reading deletes a whole store.
        raise ValueError(f"duration {text!r} is zero: a duration must be positive")
    try:
        return timedelta(seconds=count * UNITS[unit])
    except OverflowError:
        raise ValueError(f"duration {text!r} is too large") from None


def _diagnose(text: str) -> str:
    """The message for text that does not even have the `<digits><letters>` shape."""
    stripped = text.strip()
    if not stripped:
        return f"empty duration: write a positive integer and a unit, e.g. {_EXAMPLES}"
    if stripped != text:
        return f"duration {text!r} has surrounding whitespace: write it as {stripped!r}"
    if stripped.startswith("-"):
        return f"duration {text!r} is negative: a duration must be positive"
    if re.fullmatch(r"\+?[0-9]*[.,][0-9]+[a-zA-Z]*", stripped):
        return (
            f"duration {text!r} is not a whole number: use a smaller unit "
            f"(e.g. 90m rather than 1.5h)"
        )
    if " " in stripped:
        return f"duration {text!r} contains a space: write the number and unit together, e.g. 7d"
    return f"cannot parse duration {text!r}: write a positive integer and a unit, e.g. {_EXAMPLES}"


def format_duration(td: timedelta) -> str:
    """The shortest config spelling of `td`: its count in the largest unit that divides it.

    The inverse of `parse_duration` (`parse_duration(format_duration(td)) == td`)
    for positive whole-second durations; anything else has no config spelling
    and raises ValueError.
    """
    if td <= timedelta(0):
        raise ValueError(f"cannot format {td!r}: a duration must be positive")
    if td.microseconds:
        raise ValueError(f"cannot format {td!r}: durations are whole seconds")
    seconds = td.days * 86400 + td.seconds
    for unit, size in UNITS.items():
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    raise AssertionError("unreachable: every whole second count divides by 1")

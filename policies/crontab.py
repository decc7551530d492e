"""The crontab dialect of `schedule: {cron: ...}`, checked without a scheduler.

A cron expression is five fields (minute, hour, day of month, month, day of
week) or a nickname such as `@daily`. Each field is a comma list of `*`, `N`
or `N-M`, each with an optional `/step` (`N/step` means `N-max/step`);
months and weekdays may also be named (`jan`..`dec`, `sun`..`sat`), and
weekday 0 and 7 are both Sunday.

`crontab_fields` checks an expression and returns its fields as the shell
hands them to APScheduler 3's `CronTrigger.from_crontab`
(worker/service/schedule.py). It accepts nothing APScheduler would reject,
so a config that loads always schedules; it rejects APScheduler's own
extensions (`last`, `1st mon`) and the spellings APScheduler reads
differently from crontab (see `_check_part`). tests/test_crontab.py holds
the two side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["crontab_fields"]

_NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")


@dataclass(frozen=True)
class _Field:
    """One of the first four fields: its name in errors, its range, its value names."""

    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()
    """`names[i]` stands for `low + i`."""


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day of month", 1, 31),
    _Field("month", 1, 12, _MONTH_NAMES),
)


def crontab_fields(expression: str) -> tuple[str, str, str, str, str]:
    """The five fields of a crontab line, nicknames (`@daily`) expanded, weekdays by name.

    Raises ValueError saying what is wrong (a field count, a value out of
    range, a spelling crontab does not have).
    """
    expression = _NICKNAMES.get(expression.strip().lower(), expression)
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"it has {len(fields)} fields, expected 5 "
            '(minute hour day-of-month month day-of-week, e.g. "0 3 * * *")'
        )
    if not fields[2].startswith("*") and not fields[4].startswith("*"):
        # crontab fires when EITHER matches (unless one starts with `*`); APScheduler
        # only when both do.
        raise ValueError(
            "it restricts both day-of-month and day-of-week, which crontab and APScheduler "
            "read differently (either vs both); restrict only one of them"
        )
    days_of_week = _days_of_week(fields[4])
    for field, text in zip(_FIELDS, fields, strict=False):
        for part in text.split(","):
            _check_part(field, part)
    return fields[0], fields[1], fields[2], fields[3], days_of_week


def _check_part(field: _Field, part: str) -> None:
    """Raise ValueError unless `part` (one comma-separated item) is crontab APScheduler reads alike.

    APScheduler matches a month name by prefix, so it reads `jan/2` and
    `jan-3` as `jan`: names therefore take no step and do not mix with numbers.
    It also refuses a step wider than the range it steps through, which
    crontab allows; refused here too, or the trigger could not be built.
    """
    span, slash, step_text = part.partition("/")
    if slash and not (_is_number(step_text) and int(step_text) > 0):
        raise ValueError(f"{field.name} step {step_text!r} is not a positive integer")
    first_text, dash, last_text = span.partition("-")
    if span == "*":
        first, last = field.low, field.high
    elif _is_number(first_text) and (not dash or _is_number(last_text)):
        first = int(first_text)
        last = int(last_text) if dash else field.high if slash else first
    elif first_text.lower() in field.names and (not dash or last_text.lower() in field.names):
        if slash:
            raise ValueError(
                f"{field.name} {part!r}: a stepped {field.name} range is written with numbers "
                "(e.g. 1-12/3), not names"
            )
        first = field.names.index(first_text.lower()) + field.low
        last = field.names.index(last_text.lower()) + field.low if dash else first
    else:
        named = f", or a name ({field.names[0]}..{field.names[-1]})" if field.names else ""
        raise ValueError(
            f"{field.name} {part!r} is not a number, a range (N-M), a step (*/N, N-M/N)"
            f"{named}, or a comma list of them"
        )
    for value in (first, last):
        if not field.low <= value <= field.high:
            raise ValueError(f"{field.name} {value} is out of range {field.low}-{field.high}")
    if first > last:
        raise ValueError(f"{field.name} range {span!r} runs backwards")
    if slash and int(step_text) > last - first:
        raise ValueError(
            f"{field.name} step {step_text} is wider than the range {first}-{last} it steps through"
        )


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _day_of_week(token: str) -> int:
    low = token.lower()
    if low in _DOW_NAMES:
        return _DOW_NAMES.index(low)
    if _is_number(token) and int(token) <= 7:
        return int(token)
    raise ValueError(f"day of week {token!r} is not 0-7 or sun..sat")


def _days_of_week(field: str) -> str:
    """A crontab day-of-week field as the weekday names APScheduler 3 understands.

    APScheduler 3's `from_crontab` numbers weekdays from Monday (0 = mon), so a
    crontab `0` (Sunday) would fire on Mondays. Names mean the same to both, so
    every day-of-week field is spelled out by name.
    """
    if field == "*":
        return field
    days: set[int] = set()
    for part in field.split(","):
        span, slash, step_text = part.partition("/")
        if slash and not (_is_number(step_text) and int(step_text) > 0):
            raise ValueError(f"day-of-week step {step_text!r} is not a positive integer")
        step = int(step_text) if slash else 1
        if span == "*":
            low, high = 0, 6
        elif "-" in span:
            first, _, last = span.partition("-")
            low, high = _day_of_week(first), _day_of_week(last)
        else:
            low = _day_of_week(span)
            high = 7 if slash else low  # vixie cron: `1/2` means `1-7/2`
        if low > high:
            raise ValueError(f"day-of-week range {span!r} runs backwards")
        days.update(day % 7 for day in range(low, high + 1, step))
    return ",".join(_DOW_NAMES[day] for day in sorted(days))

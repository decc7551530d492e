"""`policies.crontab` checks cron text without APScheduler: held here against APScheduler 3 itself.

The daemon builds its triggers with `CronTrigger.from_crontab`
(worker/service/schedule.py) from what `crontab_fields` returns, after the
config loaded: an expression the pure check accepts and APScheduler refuses
would fail after load instead of at it (exit 2, file:line). Both read each
comma-separated item on its own, so the items are compared one field at a
time, every other field `*`.
"""

from __future__ import annotations

from datetime import UTC

import pytest
from apscheduler.triggers.cron import CronTrigger

from policies.config import Schedule
from policies.crontab import crontab_fields

BASES = ("*", "0", "1", "5", "0-30", "1-12", "10-5")
EDGES = (0, 1, 5, 7, 12, 13, 23, 24, 31, 32, 59, 60)
STEPS = (0, 1, 2, 7, 12, 13, 23, 24, 30, 31, 59, 60)
OTHER = (
    *("", "*", "**", "*/", "1/", "1-", "-1", "1--2", "1-2-3", "1/2/3", "*-5", "x", "last"),
    *("jan", "JAN", "Dec", "foo", "jan-mar", "mar-jan", "jan-foo", "sun", "mon-fri", "fri-mon"),
    *("sat-sun", "sun-sat", "7", "0-7", "*/8", "mon/2", "7/2", "٣"),
)
ITEMS = sorted(
    {
        *(str(n) for n in range(65)),
        *(f"{a}-{b}" for a in EDGES for b in EDGES),
        *(
            f"{base}/{step}"
            for base in ("*", "0", "1", "5", "0-30", "1-12", "10-5")
            for step in STEPS
        ),
        *OTHER,
    }
)

# What APScheduler accepts and `policies` refuses on purpose: crontab has no
# `last`, and APScheduler matches a month name by prefix, dropping the rest.
APSCHEDULER_ONLY = {
    (2, "last"),  # APScheduler's own last-day-of-month
    (3, "jan/2"),  # read as `jan`: the step is dropped
    (3, "jan-3"),  # read as `jan`
    (3, "jan-mar/2"),  # read as `jan-mar`
    (0, "0-0/1"),  # `(last or max)`: a range ending at 0 is read as ending at 59
    *((position, "٣") for position in range(4)),  # its `\d` takes any Unicode digit
}


def _expression(position: int, item: str) -> str:
    fields = ["*"] * 5
    fields[position] = item
    return " ".join(fields)


def _policies_accepts(expression: str) -> bool:
    try:
        crontab_fields(expression)
    except ValueError:
        return False
    return True


def _apscheduler_accepts(expression: str) -> bool:
    try:
        CronTrigger.from_crontab(expression, timezone=UTC)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("position", range(4), ids=["minute", "hour", "day", "month"])
def test_pure_check_accepts_what_apscheduler_accepts(position: int) -> None:
    """The same verdict on every item, apart from APScheduler's own spellings."""
    differ = [
        item
        for item in ITEMS
        if _policies_accepts(expr := _expression(position, item)) != _apscheduler_accepts(expr)
        and (position, item) not in APSCHEDULER_ONLY
    ]
    assert differ == []


def test_day_of_week_items_always_build_a_trigger() -> None:
    """Weekdays are handed over by name, so whatever the check accepts APScheduler builds."""
    accepted = [item for item in ITEMS if _policies_accepts(_expression(4, item))]
    assert "7" in accepted and "mon-fri" in accepted and "*/8" in accepted
    refused = [
        item
        for item in accepted
        if not _apscheduler_accepts(" ".join(crontab_fields(_expression(4, item))))
    ]
    assert refused == []


@pytest.mark.parametrize(("position", "item"), sorted(APSCHEDULER_ONLY))
def test_apscheduler_only_spellings_are_refused(position: int, item: str) -> None:
    expression = _expression(position, item)
    assert _apscheduler_accepts(expression)
    assert not _policies_accepts(expression)


def test_lists_are_checked_item_by_item() -> None:
    assert crontab_fields("0,30 8-18/2 1,15 jan,jul *") == (
        "0,30",
        "8-18/2",
        "1,15",
        "jan,jul",
        "*",
    )
    for bad in ("0,61 * * * *", "0,,30 * * * *", "* * * jan,jan/2 *"):
        assert not _policies_accepts(bad), bad


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("61 * * * *", "minute 61 is out of range 0-59"),
        ("* 24 * * *", "hour 24 is out of range 0-23"),
        ("* * 0 * *", "day of month 0 is out of range 1-31"),
        ("* * * 13 *", "month 13 is out of range 1-12"),
        ("* 5-3 * * *", "hour range '5-3' runs backwards"),
        ("*/0 * * * *", "minute step '0' is not a positive integer"),
        ("*/60 * * * *", "minute step 60 is wider than the range 0-59"),
        ("* * last * *", "day of month 'last' is not a number"),
        ("* * * jan-jun/2 *", "a stepped month range is written with numbers"),
        ("* * * foo *", "or a name (jan..dec)"),
        ("* * * * 8", "day of week '8' is not 0-7 or sun..sat"),
        ("0 3 * *", "it has 4 fields, expected 5"),
    ],
)
def test_messages_name_field_and_value(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match="invalid cron expression") as info:
        Schedule(cron=expression)
    assert message in str(info.value)

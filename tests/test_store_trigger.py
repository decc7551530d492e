"""`StoreTrigger`, the daemon's one schedule per store, on the real APScheduler 3 triggers.

The daemon tests (tests/test_daemon.py) show one pass per interval on a
live store; these walk the trigger through days of schedule times without
waiting for them: where it fires, which policies each firing hands to the
pass, and what a firing missed by more than the grace drops.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.triggers.interval import IntervalTrigger

from policies.config import Schedule
from worker.service.daemon import StoreTrigger
from worker.service.schedule import trigger_for

T0 = datetime(2025, 1, 1, 0, 0, 10, tzinfo=UTC)


def triggers(**schedules: Schedule) -> dict[str, Any]:
    """Each schedule's APScheduler trigger, `every:` ones on one grid from T0 (as at boot)."""
    out = {}
    for name, schedule in schedules.items():
        trigger = trigger_for(schedule)
        if isinstance(trigger, IntervalTrigger):
            trigger.start_date = T0
        out[name] = trigger
    return out


def fire(store: StoreTrigger, n: int) -> list[tuple[datetime, frozenset[str]]]:
    """`n` firings as APScheduler makes them, each with the policies it hands to its pass."""
    out = []
    at = store.get_next_fire_time(None, T0 - timedelta(seconds=1))
    for _ in range(n):
        assert at is not None
        out.append((at, store.take_due(at)))
        at = store.get_next_fire_time(at, at)
    return out


def points(schedule: Schedule, after: datetime, until: datetime) -> int:
    """How many times `schedule` fires in (after, until]."""
    trigger = triggers(p=schedule)["p"]
    n, at = 0, trigger.get_next_fire_time(None, after + timedelta(microseconds=1))
    while at is not None and at <= until:
        n, at = n + 1, trigger.get_next_fire_time(at, at + timedelta(microseconds=1))
    return n


def every(seconds: int) -> Schedule:
    """`{every: <seconds>s}`."""
    return Schedule(every=timedelta(seconds=seconds))


def test_policies_due_at_the_same_time_fire_once_and_others_on_their_own_times() -> None:
    """30s, 45s and an hourly cron: one firing per distinct time, naming who is due then."""
    hourly = Schedule(cron="0 * * * *")
    store = StoreTrigger(
        triggers(a=every(30), b=every(45), c=hourly),
        jitter=0,
        misfire_grace=300,
        since=T0 - timedelta(seconds=1),
    )
    got = fire(store, 6)
    s = timedelta(seconds=1)
    assert got == [
        (T0, frozenset({"a", "b"})),
        (T0 + 30 * s, frozenset({"a"})),
        (T0 + 45 * s, frozenset({"b"})),
        (T0 + 60 * s, frozenset({"a"})),
        (T0 + 90 * s, frozenset({"a", "b"})),
        (T0 + 120 * s, frozenset({"a"})),
    ]
    # Past the hour (T0 is 00:00:10): the cron policy shares 01:00:00 with nobody.
    later = StoreTrigger(triggers(a=every(30), c=hourly), jitter=0, misfire_grace=300, since=T0 - s)
    hour = T0.replace(hour=1, second=0)
    at = later.get_next_fire_time(hour - 2 * s, hour - 2 * s)
    assert at == hour  # a's times are :10 and :40 past the minute
    # Nothing was taken since T0 here: a's 00:59:40, inside the grace, joins c.
    assert later.take_due(hour) == frozenset({"a", "c"})


def test_jittered_firings_hand_every_policy_time_to_exactly_one_pass() -> None:
    """With jitter, a policy time that passes while the firing waits joins that firing's pass.

    Over 500 firings of three near schedules and a 10s jitter: every firing
    has something due (no empty pass), and each policy is in as many passes
    as it has times, so none is run twice or lost.
    """
    random.seed(7)
    schedules = {"a": every(30), "b": every(31), "c": every(47)}
    store = StoreTrigger(
        triggers(**schedules), jitter=10, misfire_grace=300, since=T0 - timedelta(seconds=1)
    )
    got = fire(store, 500)
    assert all(due for _, due in got)
    firings = [at for at, _ in got]
    assert firings == sorted(firings)
    joined = sum(len(due) > 1 for _, due in got)
    assert joined > 100  # a and b, 1s apart, mostly share a pass
    for name, schedule in schedules.items():
        passes = sum(name in due for _, due in got)
        assert passes == points(schedule, T0 - timedelta(seconds=1), firings[-1]), name


def test_a_time_missed_by_more_than_the_grace_is_dropped() -> None:
    """After a day without firing (a suspended host), only times within the grace run.

    The hourly cron's last time is over the 300s grace ago; the 30s policy
    has one a moment ago. A next call right after hands nothing again.
    """
    s = timedelta(seconds=1)
    store = StoreTrigger(
        triggers(a=every(30), c=Schedule(cron="0 * * * *")),
        jitter=0,
        misfire_grace=300,
        since=T0,
    )
    woke = T0 + timedelta(days=1, minutes=20)
    assert store.take_due(woke) == frozenset({"a"})
    assert store.take_due(woke + s) == frozenset()

"""APScheduler 3 triggers for the policies' schedules: the daemon's clock and the metrics' interval.

`policies.crontab` checks the cron text when the config loads, so building a
trigger here does not fail on a loaded config.
"""

from __future__ import annotations

import zoneinfo
from datetime import UTC

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from policies.config import Schedule
from policies.crontab import crontab_fields

__all__ = ["trigger_for"]


def trigger_for(schedule: Schedule) -> BaseTrigger:
    """The APScheduler 3 trigger for `schedule` (crontab weekdays translated, in its time zone)."""
    tz = zoneinfo.ZoneInfo(schedule.timezone) if schedule.timezone else UTC
    if schedule.cron is not None:
        return CronTrigger.from_crontab(" ".join(crontab_fields(schedule.cron)), timezone=tz)
    assert schedule.every is not None
    return IntervalTrigger(seconds=schedule.every.total_seconds(), timezone=tz)

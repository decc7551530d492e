"""`checkpoint-janitor run`: the scheduler, the HTTP endpoints, signals, reload.

Each store has one APScheduler job (coalesced, one instance, with a misfire
grace) on a `StoreTrigger`: it fires at the earliest next time of any of the
store's policies' `every:`/`cron:` schedules, plus the jitter. When it fires,
every policy with a schedule time since the previous firing is due, and the
store's runner sweeps once for all of them: policies due in the same window
share one pass. Sweeps of one store never overlap (policies that fall due
during a sweep run in the next pass). A store that is down is reconnected in
the background with exponential backoff and jitter, while the other stores
keep being swept.

The HTTP server binds first, so a port in use ends the start before any store
is opened. A reload is all or nothing: a config that does not validate, or
whose new `metrics.listen` cannot be bound, is refused and the running one
stays (`config_last_reload_successful` 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client.aiohttp import make_aiohttp_handler

from policies.config import Config, StoreConfig
from policies.loader import ConfigError
from worker.service.langgraph_json import load_worker_config
from worker.service.logs import configure_logging
from worker.service.metrics import Metrics
from worker.service.schedule import trigger_for
from worker.stores import make_engine
from worker.stores.archive import archive_factory
from worker.stores.engine import StoreEngine, StoreError
from worker.sweep import Outcome, SweepOptions, sweep
from worker.sweep.reclaim import after_sweep
from worker.sweep.tasks import cancel_and_wait

log = structlog.get_logger("checkpoint_janitor.daemon")

HEARTBEAT_SECONDS = 5.0
PING_SECONDS = 15.0


class ListenError(Exception):
    """`metrics.listen` cannot be bound (a port in use, an address not on this host)."""


_TICK = timedelta(microseconds=1)


def _first_after(trigger: Any, after: datetime) -> datetime | None:
    """The first time strictly after `after` that `trigger` (without jitter) fires at."""
    # With no previous fire time, APScheduler 3's interval and cron triggers
    # give their first time at or after `now`, on their own grid; a float
    # interval may land a microsecond short, so step on until it is past.
    at: datetime | None = trigger.get_next_fire_time(None, after + _TICK)
    while at is not None and at <= after:
        at = trigger.get_next_fire_time(at, at + _TICK)
    return at


# APScheduler 3 is untyped: its trigger base class is `Any` to mypy.
class StoreTrigger(BaseTrigger):  # type: ignore[misc]
    """One store's schedule: the union of its policies' triggers, jittered once.

    It fires at the earliest time after its previous firing at which any of
    the policies' triggers fires, plus up to `jitter` seconds. `take_due`,
    called when it fires, names every policy with a time since the last call:
    policies that fall due together, or while the jitter delays the firing,
    share one pass. A time more than `misfire_grace` (plus the jitter) in the
    past is dropped, as APScheduler drops a missed run.
    """

    def __init__(
        self, policies: Mapping[str, Any], *, jitter: float, misfire_grace: float, since: datetime
    ) -> None:
        """`policies`: each policy's trigger, without jitter; `since`: when they were scheduled."""
        self.policies = dict(policies)
        self.jitter = jitter
        self.window = timedelta(seconds=misfire_grace + jitter)
        self._since = since

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        """The first policy time after `previous_fire_time` (or from `now`), jittered."""
        # Pure in its arguments: APScheduler asks more than once for the same run.
        after = previous_fire_time if previous_fire_time is not None else now - _TICK
        times = [t for t in (_first_after(tr, after) for tr in self.policies.values()) if t]
        if not times:
            return None
        at: datetime = self._apply_jitter(min(times), self.jitter, now)
        return at

    def take_due(self, now: datetime) -> frozenset[str]:
        """The policies with a time in (previous call, `now`], none missed by over the grace."""
        since, self._since = max(self._since, now - self.window), now
        due = []
        for name, trigger in self.policies.items():
            at = _first_after(trigger, since)
            if at is not None and at <= now:
                due.append(name)
        return frozenset(due)

    def __str__(self) -> str:
        return f"store[{', '.join(f'{n}: {t}' for n, t in self.policies.items())}]"


class StoreRunner:
    """One store: its engine, its up/down state, and the sweeps due on it."""

    def __init__(self, daemon: Daemon, store: StoreConfig) -> None:
        self.daemon = daemon
        self.store = store
        self.engine: StoreEngine | None = None
        self.up = False
        self.due: set[str] = set()
        self.lock = asyncio.Lock()
        self.task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self.stop = asyncio.Event()
        """Set on shutdown, or when a reload replaces this runner: sweeps end at a batch."""

    @property
    def name(self) -> str:
        """The store's name."""
        return self.store.name

    def _set_up(self, up: bool) -> None:
        self.up = up
        self.daemon.metrics.store_up.labels(self.name).set(1 if up else 0)

    def connect(self) -> None:
        """Open the store in the background, retrying with backoff until it answers."""
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.create_task(self._connect_loop())

    async def _connect_loop(self) -> None:
        delay = 1.0
        cfg = self.daemon.config
        while not self.stop.is_set():
            engine = make_engine(self.store, cfg.store_settings(self.name))
            try:
                await engine.open()
            except StoreError as e:
                self._set_up(False)
                wait = min(delay, cfg.defaults.retry_max) * (0.5 + random.random())
                log.warning("store_down", store=self.name, error=str(e), retry_in=round(wait, 1))
                delay *= 2
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=wait)
                continue
            self.engine = engine
            self._set_up(True)
            log.info("store_up", store=self.name)
            if self.due:
                self.kick()
            return

    async def mark_down(self, error: str) -> None:
        """Close the engine and reconnect in the background."""
        if self.up:
            log.warning("store_lost", store=self.name, error=error)
        self._set_up(False)
        engine, self.engine = self.engine, None
        if engine is not None:
            try:
                await engine.close()
            except Exception as e:  # a dead connection may fail to close: it is gone anyway
                log.debug("store_close_failed", store=self.name, error=str(e))
        self.connect()

    async def ping(self) -> None:
        """Check the store answers; mark it down if not."""
        if self.engine is None or self.lock.locked():
            return
        try:
            await self.engine.ping()
        except StoreError as e:
            await self.mark_down(str(e))

    async def mark_due(self, policies: Iterable[str]) -> None:
        """`policies` are due on this store: they join the next pass."""
        self.due.update(policies)
        if self.due:
            self.kick()

    def kick(self) -> None:
        """Start a sweep task unless one runs: it picks up everything due."""
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        async with self.lock:
            while self.due and not self.stop.is_set():
                if not self.up or self.engine is None:
                    # Still due; the sweep runs when the store is back.
                    return
                due, self.due = frozenset(self.due), set()
                await self._sweep(due)

    async def _sweep(self, due: frozenset[str]) -> None:
        cfg = self.daemon.config
        assert self.engine is not None
        options = SweepOptions(
            settings=cfg.store_settings(self.name),
            max_delete_fraction=cfg.defaults.max_delete_fraction,
            allow_mass_expiry=cfg.defaults.allow_mass_expiry,
            dry_run=self.daemon.dry_run or cfg.defaults.dry_run,
            due=due,
            max_bytes=cfg.store(self.name).max_bytes,
            archive=archive_factory(cfg.store(self.name), cfg.archive_for(self.name)),
            residue_check_every=cfg.defaults.residue_check_every,
        )
        metrics = self.daemon.metrics
        report = await sweep(
            self.engine,
            cfg.policies_for(self.name),
            options,
            stop=self.stop,
            on_batch=metrics.batch_duration.labels(self.name).observe,
        )
        metrics.record(report, sorted(due))
        report.reclaim = await after_sweep(
            self.engine, cfg.reclaim_settings(self.name), options.settings, report, stop=self.stop
        )
        if report.reclaim is not None:
            metrics.record_reclaim(report.reclaim)
        if report.outcome is Outcome.STOPPED:
            # Cut short by a reload or shutdown: still due, for the successor.
            self.due |= due
        if report.outcome is Outcome.FAILED and self.engine is not None:
            try:
                await self.engine.ping()
            except StoreError as e:
                await self.mark_down(str(e))

    async def retire(self, grace: float) -> set[str]:
        """Stop this runner (a reload replaced it); returns the policies still due.

        Its sweep ends at the next batch boundary; one still running after
        `grace` seconds is cancelled, which rolls its batch back.
        """
        self.stop.set()
        if self.task is not None and not self.task.done():
            _, pending = await asyncio.wait([self.task], timeout=grace)
            await cancel_and_wait(pending)
        await self.close()
        return self.due

    async def close(self) -> None:
        """Stop reconnecting and close the engine."""
        self.stop.set()
        if self._connecting is not None:
            self._connecting.cancel()
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await engine.close()


class Daemon:
    """The long-running worker."""

    # Field by field, like the other planners' and engines' constructors: each class's
    # own settings, so their alike shape is not logic to share.
    def __init__(
        self,
        config_path: Path,
        config: Config,
        *,
        dry_run: bool = False,
        log_level: str | None = None,
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.dry_run = dry_run
        self.log_level = log_level
        """`--log-level` from the command line: it outlives reloads."""
        self.metrics = Metrics(daemon=True)
        self.scheduler = AsyncIOScheduler(timezone="UTC")
        self.runners: dict[str, StoreRunner] = {}
        self.stopping = asyncio.Event()
        self.heartbeat = time.monotonic()
        self._http: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # ------------------------------------------------------------ schedule

    def _schedule(self) -> None:
        cfg = self.config
        for job in self.scheduler.get_jobs():
            if job.id.startswith("store:"):
                job.remove()
        # Series of a policy no longer configured would keep alerting forever.
        self.metrics.keep_only(
            {(s.name, p.name) for s in cfg.stores for p in cfg.policies_for(s.name)}
        )
        now = datetime.now(UTC)
        soon = _soon()
        for store in cfg.stores:
            triggers: dict[str, Any] = {}
            for policy in cfg.policies_for(store.name):
                schedule = cfg.schedule_for(policy)
                trigger = trigger_for(schedule)
                if isinstance(trigger, IntervalTrigger):
                    # One grid start for every `every:` policy, so equal
                    # intervals fall due at the same instant. At boot it is
                    # soon, not a whole interval later; cron keeps its hour.
                    trigger.start_date = soon if not self._started else now + trigger.interval
                triggers[policy.name] = trigger
                self.metrics.set_interval(store.name, policy.name, schedule)
            if not triggers:
                continue
            store_trigger = StoreTrigger(
                triggers,
                jitter=cfg.defaults.jitter,
                misfire_grace=cfg.defaults.misfire_grace,
                since=now,
            )
            self.scheduler.add_job(
                self._fire,
                store_trigger,
                args=(store.name, store_trigger),
                id=f"store:{store.name}",
                coalesce=True,
                max_instances=1,
                misfire_grace_time=int(cfg.defaults.misfire_grace),
                replace_existing=True,
            )

    async def _fire(self, store: str, trigger: StoreTrigger) -> None:
        """A store's trigger fired: every policy due since it last fired joins one pass."""
        runner = self.runners.get(store)
        due = trigger.take_due(datetime.now(UTC))
        if runner is not None:
            await runner.mark_due(due)

    _started = False

    def _sync_stores(self) -> list[StoreRunner]:
        """Runners for the config's stores; returns the ones no longer configured."""
        wanted = {s.name: s for s in self.config.stores}
        gone = [r for name, r in self.runners.items() if name not in wanted]
        for r in gone:
            del self.runners[r.name]
        for name, store in wanted.items():
            runner = self.runners.get(name)
            if runner is None or runner.store != store:
                old = runner
                runner = StoreRunner(self, store)
                if old is not None:
                    gone.append(old)
                    # Sweeps of one store never overlap: the successor waits
                    # for the sweep its predecessor is finishing.
                    runner.lock = old.lock
                self.runners[name] = runner
                runner.connect()
        return gone

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Serve HTTP, connect stores, schedule policies, handle signals.

        Raises ListenError, with nothing else started, if `metrics.listen` cannot be bound.
        """
        await self._serve()
        self.metrics.config_loaded(True, time.time())
        self._export_dry_run()
        self._sync_stores()
        self.scheduler.start()
        self._schedule()
        self._started = True
        self.scheduler.add_job(self._beat, "interval", seconds=HEARTBEAT_SECONDS, id="heartbeat")
        self.scheduler.add_job(self._ping, "interval", seconds=PING_SECONDS, id="ping")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.create_task(self.reload()))
        log.info(
            "started",
            stores=[s.name for s in self.config.stores],
            policies=[p.name for p in self.config.policies],
            listen=self.config.metrics.listen,
            dry_run=self.dry_run or self.config.defaults.dry_run,
        )

    async def _beat(self) -> None:
        self.heartbeat = time.monotonic()

    async def _ping(self) -> None:
        for runner in list(self.runners.values()):
            await runner.ping()

    async def reload(self) -> None:
        """SIGHUP: a valid config replaces the running one; an invalid one is refused."""
        try:
            config = load_worker_config(self.config_path)
        except ConfigError as e:
            self.metrics.config_loaded(False, time.time())
            log.error("reload_refused", error=e.format_all(), config=str(self.config_path))
            return
        if config.metrics.listen != self.config.metrics.listen:
            try:
                await self._move_listener(config)
            except ListenError as e:
                self.metrics.config_loaded(False, time.time())
                log.error("reload_refused", error=str(e), config=str(self.config_path))
                return
        self.config = config
        self.metrics.config_loaded(True, time.time())
        configure_logging(config.logging.format, self.log_level or config.logging.level)
        replaced = self._sync_stores()
        self._schedule()
        self._export_dry_run()
        for old in replaced:
            due = await old.retire(config.defaults.shutdown_grace)
            new = self.runners.get(old.name)
            if new is not None and due:
                # What was due on the old runner is due on its successor.
                names = {p.name for p in config.policies_for(old.name)}
                await new.mark_due(due & names)
            if new is None:
                self.metrics.forget_store(old.name)
        log.info(
            "reloaded",
            config=str(self.config_path),
            listen=config.metrics.listen,
            stores=[s.name for s in config.stores],
            policies=[p.name for p in config.policies],
        )

    async def run_until_stopped(self) -> None:
        """Serve until SIGTERM/SIGINT, then stop within `shutdown_grace` seconds."""
        await self.stopping.wait()
        log.info("stopping", grace_seconds=self.config.defaults.shutdown_grace)
        for runner in self.runners.values():
            runner.stop.set()
        self.scheduler.shutdown(wait=False)
        running = [
            r.task for r in self.runners.values() if r.task is not None and not r.task.done()
        ]
        if running:
            # The sweep sees `stopping` at its next batch boundary; a batch
            # still running at the deadline is cancelled and rolls back.
            _, pending = await asyncio.wait(running, timeout=self.config.defaults.shutdown_grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for runner in self.runners.values():
            await runner.close()
        if self._http is not None:
            await self._http.cleanup()
        log.info("stopped")

    # ------------------------------------------------------------ http

    def _export_dry_run(self) -> None:
        # Known from the start, not only after a store's first sweep.
        dry_run = self.dry_run or self.config.defaults.dry_run
        for store in self.config.stores:
            self.metrics.dry_run.labels(store.name).set(1 if dry_run else 0)

    async def _serve(self) -> None:
        app = web.Application()
        # prometheus-client's own handler: content negotiation (OpenMetrics for
        # a Prometheus that asks for it), `name[]` filtering and gzip.
        app.router.add_get("/metrics", make_aiohttp_handler(self.metrics.registry))
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        try:
            self._site = await self._listen(self.config)
        except ListenError:
            await self._http.cleanup()
            self._http = None
            raise

    async def _listen(self, config: Config) -> web.TCPSite:
        assert self._http is not None
        m = config.metrics
        site = web.TCPSite(self._http, m.listen_host, m.listen_port)
        try:
            await site.start()
        except OSError as e:
            await site.stop()  # a failed start leaves the site registered with the runner
            # asyncio's own message repeats the address: the errno's text is the news.
            # (A host name that does not resolve has a negative errno: keep its own text.)
            errno = e.errno or 0
            reason = os.strerror(errno) if errno > 0 else (e.strerror or str(e))
            raise ListenError(f"cannot listen on {m.listen} (metrics.listen): {reason}") from None
        return site

    async def _move_listener(self, config: Config) -> None:
        """Serve on `config`'s `metrics.listen` instead; on failure keep the old address."""
        old = self._site
        try:
            new = await self._listen(config)
        except ListenError:
            if old is None:
                raise
            # The new address may overlap the old (127.0.0.1:9464 -> 0.0.0.0:9464):
            # free it and try once more, and serve on the old one again if that fails.
            await old.stop()
            try:
                new = await self._listen(config)
            except ListenError:
                self._site = await self._listen(self.config)
                raise
        else:
            if old is not None:
                await old.stop()
        self._site = new
        log.info("listening", listen=config.metrics.listen)

    async def _healthz(self, request: web.Request) -> web.Response:
        # "The scheduler loop is alive", not "the database answers": a store
        # that is down must not get the pod restarted.
        age = time.monotonic() - self.heartbeat
        if age > 3 * HEARTBEAT_SECONDS:
            return web.json_response({"status": "stale", "heartbeat_age": age}, status=503)
        return web.json_response({"status": "ok", "heartbeat_age": round(age, 3)})

    async def _readyz(self, request: web.Request) -> web.Response:
        stores = {name: r.up for name, r in self.runners.items()}
        ready = bool(stores) and all(stores.values()) and not self.stopping.is_set()
        body = {
            "status": "ready" if ready else "not ready",
            "config": str(self.config_path),
            "stores": stores,
        }
        return web.json_response(body, status=200 if ready else 503)


def _soon() -> datetime:
    return datetime.now(UTC) + timedelta(seconds=1)


async def run_daemon(
    config_path: Path, config: Config, *, dry_run: bool, log_level: str | None = None
) -> None:
    """Run the daemon until a stop signal."""
    daemon = Daemon(config_path, config, dry_run=dry_run, log_level=log_level)
    await daemon.start()
    await daemon.run_until_stopped()

"""The `checkpoint-janitor` command line.

Exit codes (for CronJobs and systemd): 0 success, 1 a sweep failed or a store
could not be used, 2 bad config or usage, 3 stopped by the safety limit.
A bad config exits 2 before any store is opened.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO, TypeVar

import click
import structlog
from click.decorators import FC

from policies.config import BatchSettings, Config, Policy, ReclaimSettings, StoreConfig
from policies.loader import ConfigError
from worker.service.config_files import check_config
from worker.service.langgraph_json import load_worker_config, translate_file
from worker.service.logs import configure_logging
from worker.service.metrics import Metrics
from worker.service.report import (
    human_bytes,
    render_holds,
    render_json,
    render_table,
    render_threads,
    report_dict,
    thread_dict,
)
from worker.stores import as_postgres, make_engine, sqlite_reclaim
from worker.stores.archive import (
    ArchiveError,
    ArchiveFactory,
    SegmentReader,
    Selection,
    archive_factory,
    read_segments,
)
from worker.stores.engine import (
    ArchivingStore,
    Counts,
    Hold,
    RestoreCounts,
    StoreEngine,
    StoreError,
)
from worker.stores.space import Reclaimed, ReclaimRefused
from worker.stores.sqlite import SqliteStore
from worker.stores.stats import namespace_display
from worker.stores.timestamps import iso_utc

# The sweep package's names (`worker/sweep/__init__.py` lists the same ones): an
# import list, not logic.
from worker.sweep import (
    Outcome,
    SweepOptions,
    SweepReport,
    ThreadFn,
    ThreadPlan,
    open_archive,
    sweep,
)
from worker.sweep.purge import HeldThreadsError, held_among, purge
from worker.sweep.reclaim import after_sweep, measure, reclaim

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_SAFETY = 0, 1, 2, 3

log = structlog.get_logger("checkpoint_janitor")
T = TypeVar("T")


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"checkpoint-janitor: {message}", err=True)
    sys.exit(code)


def _load(ctx: click.Context) -> Config:
    path = ctx.obj["config_path"]
    if path is None:
        _fail(
            "no config: pass --config PATH or set CHECKPOINT_JANITOR_CONFIG "
            "(config.example.yaml is a complete example)",
            EXIT_CONFIG,
        )
    try:
        config = load_worker_config(path)
    except ConfigError as e:
        _fail(_all_issues(e), EXIT_CONFIG)
    configure_logging(config.logging.format, ctx.obj["log_level"] or config.logging.level)
    return config


def _all_issues(error: ConfigError) -> str:
    # Every problem found, one per line, so one run of `validate` lists them all.
    return "\n".join(str(issue) for issue in error.issues)


def _blob_stores(config: Config) -> set[str]:
    # Only Postgres keeps channel values in a blobs table.
    return {s.name for s in config.stores if s.kind == "postgres"}


def _stores(config: Config, only: str | None) -> list[StoreConfig]:
    if only is None:
        return list(config.stores)
    chosen = [s for s in config.stores if s.name == only]
    if not chosen:
        _fail(f"no store named {only!r} in the config", EXIT_CONFIG)
    return chosen


async def _with_engine(
    config: Config,
    store: StoreConfig,
    body: Callable[[StoreEngine], Awaitable[T]],
    *,
    read_only: bool = False,
) -> T:
    engine = make_engine(store, config.store_settings(store.name), read_only=read_only)
    await engine.open()
    try:
        return await body(engine)
    finally:
        await engine.close()


def _progress(store: str) -> Callable[[int, int], None] | None:
    # Progress only for a person watching; logs stay the only output elsewhere.
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        click.echo(f"\r{store}: {done}/{total} threads scanned", nl=False, err=True)
        if done >= total:
            click.echo("", err=True)

    return show


async def _sweep_all(
    config: Config,
    stores: Sequence[StoreConfig],
    *,
    dry_run: bool,
    allow_mass_expiry: bool,
    now: float | None = None,
    on_thread: ThreadFn | None = None,
    reclaim: bool = False,
) -> list[SweepReport]:
    reports = []
    for store in stores:
        options = SweepOptions(
            settings=config.store_settings(store.name),
            max_delete_fraction=config.defaults.max_delete_fraction,
            dry_run=dry_run,
            allow_mass_expiry=allow_mass_expiry or config.defaults.allow_mass_expiry,
            max_bytes=store.max_bytes,
            archive=archive_factory(store, config.archive_for(store.name)),
            residue_check_every=config.defaults.residue_check_every,
        )
        policies = config.policies_for(store.name)

        async def body(
            engine: StoreEngine,
            policies: Sequence[Policy] = policies,
            options: SweepOptions = options,
        ) -> SweepReport:
            report = await sweep(
                engine,
                policies,
                options,
                now=now,
                progress=_progress(engine.name),
                on_thread=on_thread,
            )
            if reclaim:
                settings = config.reclaim_settings(engine.name)
                report.reclaim = await after_sweep(engine, settings, options.settings, report)
            return report

        try:
            # A dry run (`plan`) only reads: it works on a file it may not write.
            reports.append(await _with_engine(config, store, body, read_only=dry_run))
        except StoreError as e:
            log.error("store_unavailable", store=store.name, error=str(e))
            report = SweepReport(
                store=store.name,
                dry_run=dry_run,
                now=now or 0.0,
                policies={},
                outcome=Outcome.FAILED,
                error=str(e),
                reachable=False,
            )
            reports.append(report)
    return reports


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="checkpoint-janitor", prog_name="checkpoint-janitor")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="CHECKPOINT_JANITOR_CONFIG",
    help="YAML config (also $CHECKPOINT_JANITOR_CONFIG).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Overrides logging.level of the config.",
)
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, log_level: str | None) -> None:
    """Retention and cleanup for LangGraph checkpoint stores."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    ctx.obj["log_level"] = log_level


@main.command()
@click.option(
    "--offline",
    is_flag=True,
    help="Do not read ${file:...} or ${NAME} (environment): check everything else.",
)
@click.pass_context
def validate(ctx: click.Context, offline: bool) -> None:
    """Check the config and its policies; every error names file, line and key."""
    if not offline:
        config = _load(ctx)
        click.echo(
            f"{ctx.obj['config_path']}: ok ({len(config.stores)} stores, "
            f"{len(config.policies)} policies)"
        )
        return
    path = ctx.obj["config_path"]
    if path is None:
        _load(ctx)  # fails with the "no config" message
    try:
        unresolved = check_config(path, offline=True)
    except ConfigError as e:
        _fail(_all_issues(e), EXIT_CONFIG)
    skipped = f"; not looked up: {', '.join(unresolved)}" if unresolved else ""
    click.echo(f"{path}: ok (offline{skipped})")


# Click options declared whole, alike in shape to other commands' (see `_YES_OPTION`).
@main.command()
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "jsonl"]),
    default="table",
    help="json and jsonl list every thread that would go; jsonl streams one object a line.",
)
@click.option("--threads", "per_thread", is_flag=True, help="Table: list every thread too.")
@click.option("--store", "only", default=None, help="Only this store.")
@click.option(
    "--at",
    "at",
    default=None,
    help="Plan as if it were this UTC time (ISO 8601), e.g. to see what expires next month.",
)
@click.pass_context
def plan(ctx: click.Context, fmt: str, per_thread: bool, only: str | None, at: str | None) -> None:
    """Dry run: what each policy would delete, per store and thread, and why."""
    config = _load(ctx)
    # One moment for every store, printed with the plan: `--at` or now.
    now = _parse_at(at) if at else time.time()
    threads: dict[str, list[ThreadPlan]] = {}

    def collect(entry: ThreadPlan) -> None:
        threads.setdefault(entry.store, []).append(entry)

    def stream(entry: ThreadPlan) -> None:
        click.echo(json.dumps({"type": "thread", **thread_dict(entry)}))

    on_thread: ThreadFn | None = None
    if fmt == "jsonl":
        click.echo(json.dumps({"type": "plan", "at": iso_utc(now)}))
        on_thread = stream
    elif fmt == "json" or per_thread:
        on_thread = collect
    reports = asyncio.run(
        _sweep_all(
            config,
            _stores(config, only),
            dry_run=True,
            allow_mass_expiry=False,
            now=now,
            on_thread=on_thread,
        )
    )
    if fmt == "jsonl":
        for r in reports:
            click.echo(json.dumps({"type": "store", **report_dict(r)}))
    elif fmt == "json":
        click.echo(render_json(reports, at=now, threads=threads))
    else:
        click.echo(f"plan at {iso_utc(now)}\n")
        click.echo(render_table(reports, _blob_stores(config)))
        if per_thread:
            for r in reports:
                click.echo(f"store {r.store}: threads that would lose rows")
                click.echo(render_threads(threads.get(r.store, [])) + "\n")
    if any(r.outcome is Outcome.FAILED for r in reports):
        sys.exit(EXIT_FAILED)


def _export(config: Config, reports: Sequence[SweepReport]) -> None:
    """`once`: push the run's metrics to a Pushgateway and/or a node-exporter textfile."""
    m = config.metrics
    if m.pushgateway is None and m.textfile is None:
        return
    everything = Metrics()
    for report in reports:
        per_store = Metrics()
        names = [p.name for p in config.policies_for(report.store)]
        for metrics in (per_store, everything):
            metrics.record(report, names)
            metrics.store_up.labels(report.store).set(
                0 if report.error and not report.batches and report.outcome is Outcome.FAILED else 1
            )
            for p in config.policies_for(report.store):
                metrics.set_interval(report.store, p.name, config.schedule_for(p))
            if report.reclaim is not None:
                metrics.record_reclaim(report.reclaim)
        if m.pushgateway is not None:
            try:
                per_store.push(m.pushgateway, m.job, report.store)
            except OSError as e:
                log.error("push_failed", store=report.store, gateway=m.pushgateway, error=str(e))
    if m.textfile is not None:
        try:
            everything.write_textfile(m.textfile)
        except OSError as e:
            log.error("textfile_failed", path=m.textfile, error=str(e))


def _parse_at(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        _fail(f"--at: {text!r} is not an ISO 8601 date or time", EXIT_CONFIG)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@main.command()
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
@click.pass_context
def run(ctx: click.Context, dry_run: bool) -> None:
    """The daemon: scheduled sweeps, /metrics, /healthz, /readyz; SIGHUP reloads."""
    from worker.service.daemon import ListenError, run_daemon

    config = _load(ctx)
    try:
        asyncio.run(
            run_daemon(
                ctx.obj["config_path"], config, dry_run=dry_run, log_level=ctx.obj["log_level"]
            )
        )
    except ListenError as e:
        _fail(str(e), EXIT_FAILED)


@main.command()
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
@click.option(
    "--allow-mass-expiry",
    is_flag=True,
    help="Lift the safety limit (max_delete_fraction) for this run only.",
)
@click.option("--store", "only", default=None, help="Only this store.")
@click.pass_context
def once(ctx: click.Context, dry_run: bool, allow_mass_expiry: bool, only: str | None) -> None:
    """Apply every policy once, then exit (for CronJobs and timers)."""
    config = _load(ctx)
    dry_run = dry_run or config.defaults.dry_run
    reports = asyncio.run(
        _sweep_all(
            config,
            _stores(config, only),
            dry_run=dry_run,
            allow_mass_expiry=allow_mass_expiry,
            reclaim=True,
        )
    )
    # The summary always goes to stdout: a table for a person, JSON for a log collector.
    if sys.stdout.isatty():
        click.echo(render_table(reports, _blob_stores(config)))
    else:
        click.echo(render_json(reports))
    _export(config, reports)
    outcomes = {r.outcome for r in reports}
    if Outcome.FAILED in outcomes:
        sys.exit(EXIT_FAILED)
    if Outcome.SAFETY_STOP in outcomes:
        for r in reports:
            if r.outcome is Outcome.SAFETY_STOP:
                click.echo(
                    f"store {r.store}: stopped by the safety limit: {r.expiries_wanted} threads "
                    f"to expire, at most {r.expiry_limit} per sweep (policy "
                    f"{r.limit_reached_by}); none was expired. Check the clock and the policy "
                    "(`plan --threads` lists them); then raise defaults.max_delete_fraction "
                    "or run `once --allow-mass-expiry` once.",
                    err=True,
                )
        sys.exit(EXIT_SAFETY)


@main.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--store", "only", default=None, help="Only this store.")
@click.pass_context
def stats(ctx: click.Context, fmt: str, only: str | None) -> None:
    """What a store holds: rows, bytes, ages per namespace, largest threads."""
    config = _load(ctx)

    async def collect() -> list[dict[str, Any]]:
        out = []
        now = datetime.now(UTC).timestamp()

        for store in _stores(config, only):
            try:
                out.append(
                    await _with_engine(config, store, lambda e: _stats_of(e, now), read_only=True)
                )
            except StoreError as e:
                _fail(str(e), EXIT_FAILED)
        return out

    result = asyncio.run(collect())
    if fmt == "json":
        click.echo(json.dumps({"stores": result}, indent=2))
        return
    for s in result:
        click.echo(f"store {s['store']} ({s['kind']}): {s['threads']} threads")
        for table, t in s["tables"].items():
            click.echo(f"  {table:<18} {t['rows']:>12} rows  {human_bytes(t['bytes']):>10}")
        for key in ("store_bytes", "file_bytes", "wal_bytes", "reclaimable_bytes"):
            if key in s:
                click.echo(f"  {key.replace('_', ' '):<18} {human_bytes(s[key]):>29}")
        for line in _space_lines(s["space"]):
            click.echo(f"  {line}")
        click.echo(f"  {'held threads':<18} {s['held_threads']:>12}")
        click.echo("  checkpoint ages per namespace:")
        for ns, buckets in s["ages"].items():
            cells = ", ".join(f"{b} {n}" for b, n in buckets.items())
            click.echo(f"    {namespace_display(ns)}: {cells}")
        click.echo("  largest threads:")
        for t in s["largest_threads"]:
            click.echo(
                f"    {t['thread_id']}: {t['checkpoints']} checkpoints, {human_bytes(t['bytes'])}"
            )


async def _stats_of(engine: StoreEngine, now: float) -> dict[str, Any]:
    """`stats` of one store, with its space as `reclaim` and the metrics see it."""
    out: dict[str, Any] = await engine.stats(now)  # type: ignore[attr-defined]
    space = await measure(engine)
    out.update(
        store_bytes=space.store_bytes,
        reclaimable_bytes=space.reclaimable_bytes,
        space=space.detail,
        held_threads=len(await engine.holds()),
    )
    return out


def _space_lines(detail: dict[str, Any]) -> list[str]:
    if "auto_vacuum" in detail:
        return [
            f"auto_vacuum {detail['auto_vacuum']}: {detail['free_pages']} of "
            f"{detail['page_count']} pages free ({detail['free_fraction']:.0%})"
        ]
    lines = [f"space per table (reclaimable: {detail['bloat_estimate']}):"]
    for name, t in sorted(detail["tables"].items()):
        lines.append(
            f"  {name:<18} {t['dead_rows']:>10} dead rows  table {human_bytes(t['table_bytes'])}"
            f"  indexes {human_bytes(t['index_bytes'])}"
            f"  reclaimable {human_bytes(t['reclaimable_bytes'])}"
            f"  last vacuum {t['last_vacuum'] or 'never'}"
        )
    return lines


# Options the same word for word are built once below; the others are each
# command's own, declared whole as click has them: alike in shape only.
_YES_OPTION = click.option(
    "--yes", is_flag=True, help="Do not ask for confirmation (required without a terminal)."
)
"""`--yes` of the commands that change a store (`purge`, `restore`)."""


def _thread_prefix_option(verb: str) -> Callable[[FC], FC]:
    """`--thread-prefix` of `purge` and `restore`: `verb` says what they do to the threads."""
    return click.option(
        "--thread-prefix",
        "prefix",
        default=None,
        help=f"{verb} every thread whose id starts with this (exact, case-sensitive).",
    )


@main.command(name="purge")
@click.option(
    "--thread",
    "threads",
    multiple=True,
    help="Delete this thread whole (repeat for several).",
)
@_thread_prefix_option("Delete")
@click.option("--store", "only", default=None, help="Only this store.")
@click.option(
    "--archive",
    "keep_archive",
    is_flag=True,
    help="Archive what goes first, to the store's `archive` (off by default: erasure).",
)
@_YES_OPTION
@click.pass_context
def purge_cmd(
    ctx: click.Context,
    threads: tuple[str, ...],
    prefix: str | None,
    only: str | None,
    keep_archive: bool,
    yes: bool,
) -> None:
    """Delete named threads now (user logout, GDPR erasure): every namespace and write."""
    _check_purge_args(threads, prefix, yes)
    config = _load(ctx)
    named = list(dict.fromkeys(threads))
    stores = _stores(config, only)
    bare = [s.name for s in stores if config.archive_for(s.name) is None]
    if keep_archive and bare:
        _fail(
            f"purge --archive: no `archive` configured for store {', '.join(bare)} "
            "(stores[].archive or defaults.archive)",
            EXIT_CONFIG,
        )
    _refuse_held(config, stores, named, prefix)
    failed = False
    for store in stores:
        factory = archive_factory(store, config.archive_for(store.name)) if keep_archive else None

        async def body(engine: StoreEngine, factory: ArchiveFactory | None = factory) -> bool:
            return await _purge_store(engine, named, prefix, yes, factory)

        failed |= not _run_purge(config, store, body)
    if failed:
        sys.exit(EXIT_FAILED)


def _check_purge_args(threads: tuple[str, ...], prefix: str | None, yes: bool) -> None:
    """Refuse a purge that names no thread, every thread, or cannot ask, before any store opens."""
    if bool(threads) == (prefix is not None):
        _fail(
            "purge needs --thread ID (one or more) or --thread-prefix PREFIX, not both",
            EXIT_CONFIG,
        )
    if prefix == "":
        _fail("--thread-prefix must not be empty (it would name every thread)", EXIT_CONFIG)
    if not yes and not sys.stdin.isatty():
        # No one can answer the question: say so before any store is opened.
        _fail("purge asks before deleting; without a terminal, pass --yes", EXIT_CONFIG)


async def _purge_store(
    engine: StoreEngine,
    named: list[str],
    prefix: str | None,
    yes: bool,
    factory: ArchiveFactory | None,
) -> bool:
    """Show what one store would lose, ask unless `yes`, then purge it (archived first if asked)."""
    found = await purge(engine, named, prefix, dry_run=True)
    if prefix is not None:
        what = f"threads {prefix!r}*"
    elif len(named) == 1:
        what = f"thread {named[0]!r}"
    else:
        what = f"threads {', '.join(map(repr, named))}"
    blobs = f", {found.blobs} blobs" if found.blobs else ""
    click.echo(
        f"store {engine.name}: {what}: {found.threads} threads, "
        f"{found.checkpoints} checkpoints, {found.writes} writes{blobs}"
    )
    if found.threads == 0:
        return True
    if not yes and not click.confirm("Delete them?", default=False):
        click.echo("nothing deleted")
        return True
    archive = await open_archive(engine, factory, time.time()) if factory else None
    try:
        done = await purge(engine, named, prefix, dry_run=False, archive=archive)
    finally:
        if archive is not None:
            archive.close()
    blobs = f", {done.blobs} blobs" if done.blobs else ""
    kept = ""
    if archive is not None:
        kept = f"; archived {sum(archive.completed_rows.values())} rows"
    click.echo(
        f"store {engine.name}: deleted {done.threads} threads, "
        f"{done.checkpoints} checkpoints, {done.writes} writes{blobs}{kept}"
    )
    return True


def _run_purge(
    config: Config, store: StoreConfig, body: Callable[[StoreEngine], Awaitable[bool]]
) -> bool:
    """Run one store's purge; False if it failed (the next store is still purged)."""
    try:
        asyncio.run(_with_engine(config, store, body))
    except StoreError as e:
        log.error("store_unavailable", store=store.name, error=str(e))
        return False
    except ArchiveError as e:
        # The batch that could not be archived deleted nothing.
        click.echo(f"checkpoint-janitor: {e}", err=True)
        return False
    except HeldThreadsError as e:
        # Held while the purge ran: the batch's re-check kept them whole.
        done = e.deleted or Counts()
        _fail(
            f"store {store.name}: deleted {done.threads} threads; refused "
            f"{', '.join(map(repr, e.threads))}: put on legal hold during the purge "
            "(`checkpoint-janitor release` lifts a hold)",
            EXIT_CONFIG,
        )
    return True


@main.command(name="restore")
@click.option("--store", "name", required=True, help="The store to put the rows back into.")
@click.option(
    "--from",
    "source",
    required=True,
    help="The archive: its path (or URL) as in the config, a store's or sweep's folder, "
    "or one segment file.",
)
@click.option(
    "--thread",
    "thread_ids",
    multiple=True,
    help="Restore this thread (repeat for several).",
)
@click.option(
    "--threads-from",
    "threads_file",
    type=click.File("r", encoding="utf-8"),
    default=None,
    help="Restore the threads named in this file, one id a line (`-`: standard input).",
)
@_thread_prefix_option("Restore")
@click.option("--all", "everything", is_flag=True, help="Restore every archived thread.")
@click.option("--dry-run", is_flag=True, help="Show what would be restored; change nothing.")
@_YES_OPTION
@click.pass_context
def restore_cmd(
    ctx: click.Context,
    name: str,
    source: str,
    thread_ids: tuple[str, ...],
    threads_file: TextIO | None,
    prefix: str | None,
    everything: bool,
    dry_run: bool,
    yes: bool,
) -> None:
    """Put archived rows back: missing rows are inserted, existing rows left alone.

    Only the segments that hold rows of the selected threads are read and
    verified (`--all` verifies every one).
    """
    select = _restore_selection(thread_ids, threads_file, prefix, everything)
    if not yes and not dry_run and not sys.stdin.isatty():
        _fail("restore asks before writing; without a terminal, pass --yes", EXIT_CONFIG)
    if "://" not in source and not Path(source).exists():
        _fail(f"--from {source}: no such file or directory", EXIT_CONFIG)
    config, store = _one_store(ctx, name)
    segments, passed = _restore_segments(source, store.name, select)
    if not segments:
        if passed:
            click.echo(
                f"store {store.name}: none of the {passed} archive segments under {source} "
                "holds the selected threads"
            )
        else:
            click.echo(f"store {store.name}: no archive segments of this store under {source}")
        return

    async def body(engine: StoreEngine) -> None:
        if not isinstance(engine, ArchivingStore):
            raise StoreError(engine.name, "this store engine cannot restore from an archive")
        found = await engine.restore(segments, select, dry_run=True)
        _show_restore(engine.name, found, len(segments), done=False, passed=passed)
        _show_unarchived(select, found)
        if not found.threads() or dry_run:
            return
        if not yes and not click.confirm("Restore them?", default=False):
            click.echo("nothing restored")
            return
        done = await engine.restore(segments, select, dry_run=False)
        _show_restore(engine.name, done, len(segments), done=True)

    try:
        asyncio.run(_with_engine(config, store, body, read_only=dry_run))
    except (StoreError, ArchiveError) as e:
        _fail(str(e), EXIT_FAILED)
    finally:
        for seg in segments:
            seg.close()


def _restore_selection(
    thread_ids: tuple[str, ...],
    threads_file: TextIO | None,
    prefix: str | None,
    everything: bool,
) -> Selection:
    """The threads a restore takes, or exit 2 on a usage error (before any store opens)."""
    named = list(thread_ids)
    if threads_file is not None:
        # One id a line, exactly (ids may hold spaces); only the line end is dropped.
        listed = [line.rstrip("\r\n") for line in threads_file]
        if not any(listed):
            _fail(f"--threads-from {threads_file.name}: no thread id in it", EXIT_CONFIG)
        named += [t for t in listed if t]
    chosen = [bool(thread_ids) or threads_file is not None, prefix is not None, everything]
    if chosen.count(True) != 1:
        _fail(
            "restore needs one of --thread ID (repeatable) / --threads-from FILE, "
            "--thread-prefix PREFIX or --all",
            EXIT_CONFIG,
        )
    if prefix == "":
        _fail("--thread-prefix must not be empty (use --all to restore everything)", EXIT_CONFIG)
    if everything or prefix is not None:
        return Selection(prefix=prefix)
    return Selection.of_threads(named)


def _restore_segments(
    source: str, store: str, select: Selection
) -> tuple[list[SegmentReader], int]:
    """The segments under `source` holding rows of the selected threads, each verified,
    and how many others were passed by unread; exit 1 on one that cannot be used.

    A segment that holds selected rows and does not verify stops the restore
    before any row goes in; one that cannot be opened at all does too, since
    it may hold them. A damaged segment holding none of them does not block.
    """
    segments: list[SegmentReader] = []
    passed = 0
    try:
        for seg in read_segments(source, store=store):
            segments.append(seg)
            if seg.holds(select):
                seg.verify()
            else:
                segments.pop().close()
                passed += 1
    except ArchiveError as e:
        for seg in segments:
            seg.close()
        _fail(str(e), EXIT_FAILED)
    return segments, passed


def _show_unarchived(select: Selection, found: RestoreCounts) -> None:
    """Name the selected threads the archive has nothing missing for (a typo shows here)."""
    named = sorted(select.thread_ids or ())
    if not named:
        return
    quiet = [t for t in named if t not in found.inserted and t not in found.relinked]
    if quiet:
        shown = ", ".join(quiet[:10]) + (f" and {len(quiet) - 10} more" if len(quiet) > 10 else "")
        click.echo(f"  {len(quiet)} of the {len(named)} named threads get nothing back: {shown}")


def _show_restore(
    store: str, counts: RestoreCounts, segments: int, *, done: bool, passed: int = 0
) -> None:
    totals = counts.totals()
    parts = [f"{n} {table}" for table, n in sorted(totals.items()) if table != "parents"]
    links = f", {totals['parents']} parent links" if totals["parents"] else ""
    if done:
        click.echo(
            f"store {store}: restored {len(counts.threads())} threads: "
            f"{', '.join(parts) or 'no rows'}{links}"
        )
        return
    unread = f" ({passed} more hold none of the selected threads: not read)" if passed else ""
    click.echo(
        f"store {store}: {segments} archive segments{unread}; {len(counts.threads())} threads to "
        f"restore ({', '.join(parts) or 'no rows'}{links}; "
        f"{counts.present} archived rows already in the store are left alone)"
    )
    for tid in counts.threads():
        per = counts.inserted.get(tid, {})
        cells = [f"{n} {table}" for table, n in sorted(per.items())]
        if tid in counts.relinked:
            cells.append(f"{counts.relinked[tid]} parent links")
        click.echo(f"  {tid}: {', '.join(cells)}")


@main.command(name="reclaim")
@click.option(
    "--store", "only", default=None, help="Only this store (required with --convert, --full)."
)
@click.option(
    "--convert",
    is_flag=True,
    help="SQLite, once per file: switch it to incremental auto-vacuum with one VACUUM "
    "(rewrites the file and blocks writers meanwhile).",
)
@click.option(
    "--full",
    is_flag=True,
    help="Postgres: VACUUM FULL, which locks each table against reads and writes while it runs.",
)
@click.option("--yes", is_flag=True, help="Do not ask before --convert or --full.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def reclaim_cmd(
    ctx: click.Context, only: str | None, convert: bool, full: bool, yes: bool, fmt: str
) -> None:
    """Give disk space back now: SQLite in short steps, Postgres VACUUM (ANALYZE)."""
    if convert and full:
        _fail("--convert (sqlite) and --full (postgres) exclude each other", EXIT_CONFIG)
    if (convert or full) and only is None:
        _fail("--convert and --full rewrite a store: name it with --store", EXIT_CONFIG)
    config = _load(ctx)
    results: list[Reclaimed] = []
    failed = False
    for store in _stores(config, only):
        if convert and store.kind != "sqlite":
            _fail(f"--convert is for sqlite stores; {store.name} is postgres (see --full)", 2)
        if full and store.kind != "postgres":
            _fail(f"--full is for postgres stores; {store.name} is sqlite (see --convert)", 2)
        settings = config.reclaim_settings(store.name)
        batch = config.store_settings(store.name)

        async def body(
            engine: StoreEngine, settings: ReclaimSettings = settings, batch: BatchSettings = batch
        ) -> Reclaimed | None:
            if convert:
                return await _convert(engine, settings, yes)
            if full:
                return await _vacuum_full(engine, yes)
            return await reclaim(engine, settings, batch)

        try:
            result = asyncio.run(_with_engine(config, store, body))
        except (ReclaimRefused, StoreError) as e:
            click.echo(f"checkpoint-janitor: {e}", err=True)
            failed = True
            continue
        if result is None:
            continue
        results.append(result)
        log.info("reclaim", **result.as_dict())
        if fmt == "table":
            click.echo(_reclaim_line(result))
    if fmt == "json":
        click.echo(json.dumps({"reclaimed": [r.as_dict() for r in results]}, indent=2))
    if failed:
        sys.exit(EXIT_FAILED)


async def _convert(engine: StoreEngine, settings: ReclaimSettings, yes: bool) -> Reclaimed | None:
    assert isinstance(engine, SqliteStore)  # the caller checked the store's kind
    plan = await sqlite_reclaim.plan_convert(engine, settings)
    if plan.pages.auto_vacuum == sqlite_reclaim.INCREMENTAL:
        # Done before (perhaps by a run that was killed after its commit): not a failure.
        click.echo(f"store {engine.name}: {plan.refusal}")
        return None
    for line in plan.describe():
        click.echo(line)
    if plan.refusal is not None:
        raise ReclaimRefused(f"store {engine.name}: refusing to convert: {plan.refusal}")
    if not yes and not click.confirm("Convert now?", default=False):
        click.echo("nothing changed")
        return None
    expected = plan.expected_seconds

    def progress(elapsed: float) -> None:
        # On a terminal a person watches; elsewhere one log line per tick.
        if sys.stderr.isatty():
            click.echo(
                f"\rconverting: {elapsed:.0f} s of about {expected:.0f} s", nl=False, err=True
            )
        else:
            log.debug("convert_progress", store=engine.name, seconds=round(elapsed, 1))

    result = await sqlite_reclaim.convert(engine, settings, plan, progress)
    if sys.stderr.isatty():
        click.echo("", err=True)
    return result


async def _vacuum_full(engine: StoreEngine, yes: bool) -> Reclaimed | None:
    # Imported here: a SQLite-only install has no Postgres driver.
    from worker.stores import postgres_reclaim

    pg = as_postgres(engine)
    assert pg is not None  # the caller checked the store's kind
    space = await measure(engine)
    click.echo(
        f"store {engine.name}: VACUUM FULL rewrites {', '.join(postgres_reclaim.TABLES)} one at "
        "a time. Each holds an ACCESS EXCLUSIVE lock while it is rewritten: the application "
        "can neither read nor write that table until it is done. It needs free disk for the "
        "new copy of each table and its indexes."
    )
    for line in _space_lines(space.detail):
        click.echo(f"  {line}")
    if not yes and not click.confirm("Run VACUUM FULL now?", default=False):
        click.echo("nothing changed")
        return None
    return await postgres_reclaim.vacuum(pg, full=True)


def _reclaim_line(r: Reclaimed) -> str:
    line = (
        f"store {r.store}: {r.action}: {human_bytes(r.before.store_bytes)} -> "
        f"{human_bytes(r.after.store_bytes)} ({human_bytes(r.reclaimed_bytes)} given back, "
        f"{human_bytes(r.after.reclaimable_bytes)} still reclaimable) in {r.seconds:.1f} s"
    )
    if r.steps:
        line += f", {r.steps} steps, longest {r.longest_step_seconds:.3f} s"
    if r.tables:
        line += f", tables {', '.join(r.tables)}"
    return line + (f"\n  {r.note}" if r.note else "")


def _refuse_held(
    config: Config, stores: Sequence[StoreConfig], named: Sequence[str], prefix: str | None
) -> None:
    """Exit 2 naming the held threads if the purge names any, in any store, before deleting."""
    refused: list[str] = []
    for store in stores:

        async def body(engine: StoreEngine) -> list[str]:
            return held_among(await engine.holds(), named, prefix)

        try:
            held = asyncio.run(_with_engine(config, store, body, read_only=True))
        except StoreError as e:
            # The purge itself reports an unusable store, store by store.
            log.error("store_unavailable", store=store.name, error=str(e))
            continue
        refused += [f"store {store.name}: {t!r}" for t in held]
    if refused:
        _fail(
            "purge refused, nothing deleted: these threads are on legal hold:\n  "
            + "\n  ".join(refused)
            + "\n(`checkpoint-janitor holds --store NAME` lists holds; "
            "`release` lifts one)",
            EXIT_CONFIG,
        )


def _operator() -> str | None:
    """Who places a hold, by default: the OS user (meaningless in a container: pass --by)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def _one_store(ctx: click.Context, name: str) -> tuple[Config, StoreConfig]:
    config = _load(ctx)
    return config, _stores(config, name)[0]


@main.command(name="hold")
@click.option("--store", "only", required=True, help="The store holding the thread.")
@click.option("--thread", "thread_id", required=True, help="The thread to hold.")
@click.option("--reason", default=None, help="Why (a case number, a ticket).")
@click.option("--by", "held_by", default=None, help="Who holds it (default: the OS user).")
@click.pass_context
def hold_cmd(
    ctx: click.Context, only: str, thread_id: str, reason: str | None, held_by: str | None
) -> None:
    """Put a thread on legal hold: never expired, trimmed or purged until released.

    The thread need not exist yet: a hold may precede its data.
    """
    config, store = _one_store(ctx, only)

    async def body(engine: StoreEngine) -> tuple[Hold | None, list[Hold]]:
        placed = await engine.hold(thread_id, reason, held_by or _operator())
        return placed, ([] if placed else await engine.holds())

    try:
        placed, holds = asyncio.run(_with_engine(config, store, body))
    except StoreError as e:
        _fail(str(e), EXIT_FAILED)
    if placed is None:
        old = next((h for h in holds if h.thread_id == thread_id), None)
        since = f" since {iso_utc(old.held_at)}" if old else ""
        click.echo(f"store {store.name}: thread {thread_id!r} was already held{since}; unchanged")
        return
    log.info("thread_held", store=store.name, thread_id=thread_id, reason=reason, by=placed.held_by)
    click.echo(f"store {store.name}: thread {thread_id!r} held")


@main.command(name="release")
@click.option("--store", "only", required=True, help="The store holding the thread.")
@click.option("--thread", "thread_id", required=True, help="The thread to release.")
@click.pass_context
def release_cmd(ctx: click.Context, only: str, thread_id: str) -> None:
    """Lift a legal hold: the policies apply to the thread again from the next sweep."""
    config, store = _one_store(ctx, only)
    try:
        lifted = asyncio.run(_with_engine(config, store, lambda e: e.release(thread_id)))
    except StoreError as e:
        _fail(str(e), EXIT_FAILED)
    if not lifted:
        click.echo(f"store {store.name}: thread {thread_id!r} was not held; nothing to release")
        return
    log.info("thread_released", store=store.name, thread_id=thread_id)
    click.echo(f"store {store.name}: thread {thread_id!r} released")


@main.command(name="holds")
@click.option("--store", "only", required=True, help="The store to list.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def holds_cmd(ctx: click.Context, only: str, fmt: str) -> None:
    """List the legal holds of a store: thread, since when, by whom, why."""
    config, store = _one_store(ctx, only)
    try:
        holds = asyncio.run(_with_engine(config, store, lambda e: e.holds(), read_only=True))
    except StoreError as e:
        _fail(str(e), EXIT_FAILED)
    rows = [
        {
            "thread_id": h.thread_id,
            "held_at": iso_utc(h.held_at),
            "held_by": h.held_by,
            "reason": h.reason,
        }
        for h in holds
    ]
    if fmt == "json":
        click.echo(json.dumps({"store": store.name, "holds": rows}, indent=2))
        return
    click.echo(f"store {store.name}: {len(rows)} threads on legal hold")
    if rows:
        click.echo(render_holds(rows))


@main.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Fill the config's SQLite store with real LangGraph threads, then plan and sweep it."""
    from worker.service.demo import run_demo

    # The tables below say what happened; per-thread audit lines would bury them.
    ctx.obj["log_level"] = ctx.obj["log_level"] or "warning"
    config = _load(ctx)
    stores = [s for s in config.stores if s.kind == "sqlite"]
    if not stores:
        _fail("demo needs a sqlite store in the config", EXIT_CONFIG)
    store = stores[0]
    assert store.path is not None
    asyncio.run(run_demo(store.path))
    click.echo(f"filled {store.path} with demo threads\n")
    click.echo("$ checkpoint-janitor plan   (now)")
    ctx.invoke(plan, fmt="table", only=store.name, at=None)
    later = datetime.fromtimestamp(datetime.now(UTC).timestamp() + 45 * 86400, UTC)
    click.echo(f"$ checkpoint-janitor plan --at {later.date()}   (in 45 days)")
    ctx.invoke(plan, fmt="table", only=store.name, at=later.isoformat())
    click.echo("$ checkpoint-janitor once")
    reports = asyncio.run(_sweep_all(config, [store], dry_run=False, allow_mass_expiry=False))
    click.echo(render_table(reports, _blob_stores(config)))


@main.command()
@click.argument("langgraph_json", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default="langgraph-ttl", show_default=True, help="The policy's name.")
def translate(langgraph_json: Path, name: str) -> None:
    """Print the policies equivalent to a langgraph.json's checkpointer.ttl (YAML)."""
    try:
        click.echo(translate_file(langgraph_json, name=name), nl=False)
    except ConfigError as e:
        _fail(_all_issues(e), EXIT_CONFIG)

"""A private, throwaway PostgreSQL cluster for the test session.

``PgServer`` runs ``initdb`` into a fresh temporary directory and starts the
server on 127.0.0.1 and a free port, with the Unix socket inside that
directory.  Authentication is real: local (Unix socket) connections are
trusted, TCP connections need the superuser password (scram-sha-256).

``initdb`` and ``pg_ctl`` refuse to run as root; as root the cluster belongs
to the ``postgres`` user that Debian's ``postgresql`` package creates (or to
``$PGSERVER_USER``) and every server command runs through ``runuser``.

``stop()`` only stops the server: data directory and port are kept, so
``start()`` (or ``restart()``) brings the same cluster back on the same port.
``close()`` stops it and removes the temporary directory.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

SUPERUSER = "postgres"
HOST = "127.0.0.1"
_SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
_DB_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_STOP_MODES = ("smart", "fast", "immediate")
COLLATIONS = {
    # The cluster's own: byte order, as Python compares str.
    "c": "",
    # As production clusters have: case-insensitive at the first level, punctuation
    # ordered linguistically. ICU needs no OS locale (machines here have no en_US).
    "icu": "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.utf8'",
}
"""Default collations a test database is created with (``create_database``)."""


class PgServerError(RuntimeError):
    """The throwaway server could not be set up, started or used."""


def _version_key(path: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,); 9.6 -> (9, 6)
    version = Path(path).parent.name
    return tuple(int(p) for p in re.findall(r"\d+", version)) or (0,)


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _SERVER_BINARIES)


def find_bindir() -> Path:
    """Directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Order: ``$PG_BINDIR``, ``pg_config --bindir``, the newest
    ``/usr/lib/postgresql/*/bin``, then ``initdb`` on ``PATH``.
    """
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    installed = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    candidates += [Path(p) for p in installed]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if _has_server_binaries(bindir):
            return bindir
    raise PgServerError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found "
        f"(looked in: {', '.join(map(str, candidates)) or 'nothing'}); "
        "install Debian's 'postgresql' package (scripts/test does this)"
    )


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def unique_db_name(hint: str = "") -> str:
    """A fresh, valid, lower-case database name, optionally carrying ``hint``."""
    stem = re.sub(r"[^a-z0-9_]+", "_", hint.lower()).strip("_")[:40]
    return f"t_{stem}_{uuid.uuid4().hex[:10]}" if stem else f"t_{uuid.uuid4().hex[:16]}"


class PgServer:
    """A throwaway PostgreSQL cluster; see the module docstring."""

    def __init__(self, *, bindir: Path | str | None = None, startup_timeout: float = 60.0) -> None:
        self._bindir = Path(bindir) if bindir else None
        self.startup_timeout = startup_timeout
        self.password = secrets.token_urlsafe(18)
        self._port: int | None = None
        self._base: Path | None = None
        self._owner: pwd.struct_passwd | None = None
        self.init_seconds: float | None = None
        self.last_start_seconds: float | None = None
        self._atexit_registered = False

    # -- public API -----------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise PgServerError("server was never started")
        return self._port

    @property
    def user(self) -> str:
        return SUPERUSER

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_bindir()
        return self._bindir

    @property
    def base_dir(self) -> Path:
        if self._base is None:
            raise PgServerError("server was never started")
        return self._base

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "sock"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "server.log"

    def dsn(self, dbname: str = "postgres") -> str:
        """URL DSN over TCP with the superuser password."""
        return (
            f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}"
            f"@{HOST}:{self.port}/{quote(dbname, safe='')}"
        )

    def start(self) -> None:
        """Start the server; the first call creates the cluster.  Idempotent."""
        if self._base is None:
            self._init_cluster()
        elif self.is_running():
            return
        t0 = time.monotonic()
        attempts = 3 if self.last_start_seconds is None else 1
        for attempt in range(attempts):
            result = self._pg_ctl(
                ["start", "-w", "-t", str(int(self.startup_timeout)), "-l", str(self.log_file)],
                timeout=self.startup_timeout + 15,
            )
            if result.returncode == 0:
                break
            log = self.log_tail()
            # A port picked by free_port() can be taken by someone else before we bind it.
            if attempt + 1 < attempts and "could not bind" in log:
                self._port = free_port()
                self._write_settings()
                continue
            raise PgServerError(
                f"pg_ctl start failed (exit {result.returncode}): {result.stdout.strip()}"
                f"\n--- server log ---\n{log}"
            )
        self.last_start_seconds = time.monotonic() - t0

    def stop(self, mode: str = "fast") -> None:
        """Stop the server, keeping data directory and port for a later start().

        ``mode`` is pg_ctl's shutdown mode: "fast" (default: disconnects clients),
        "smart" (waits for clients) or "immediate" (no checkpoint, like a crash).
        """
        if mode not in _STOP_MODES:
            raise ValueError(f"mode must be one of {_STOP_MODES}, not {mode!r}")
        if self._base is None or not self.is_running():
            return
        result = self._pg_ctl(["stop", "-w", "-t", "60", "-m", mode], timeout=75)
        if result.returncode != 0 and self.is_running():
            raise PgServerError(f"pg_ctl stop failed: {result.stdout.strip()}\n{self.log_tail()}")

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again: same data directory, same port."""
        self.stop(mode)
        self.start()

    def ensure_running(self) -> None:
        if not self.is_running():
            self.start()

    def is_running(self) -> bool:
        """Whether the postmaster process of this cluster is alive."""
        if self._base is None:
            return False
        pid = self.pid
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    @property
    def pid(self) -> int | None:
        """PID of the postmaster, from postmaster.pid (None when not running)."""
        if self._base is None:
            return None
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        """Stop the server (fast, else immediate) and delete the temporary directory."""
        if self._base is None:
            return
        try:
            self.stop("fast")
        except Exception:
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self._base, ignore_errors=True)
        self._base = None

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL through psql over the Unix socket (trusted) and return its output."""
        psql = self.bindir / "psql"
        exe = str(psql) if os.access(psql, os.X_OK) else shutil.which("psql")
        if exe is None:
            raise PgServerError("psql not found")
        cmd = [
            exe, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER,
            "-d", dbname, "-c", sql,
        ]  # fmt: skip
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=60,
            env=self._env(),
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise PgServerError(f"psql failed ({sql!r}): {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str, collation: str = "c") -> str:
        """Create database ``name`` with a default collation of ``COLLATIONS``; return its DSN."""
        self._check_db_name(name)
        self.psql(f'CREATE DATABASE "{name}" {COLLATIONS[collation]}')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting its clients."""
        self._check_db_name(name)
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except (OSError, PgServerError):
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- internals ------------------------------------------------------------------

    @staticmethod
    def _check_db_name(name: str) -> None:
        if not _DB_NAME_RE.match(name):
            raise ValueError(f"database name must match {_DB_NAME_RE.pattern}: {name!r}")

    @staticmethod
    def _env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _as_owner(self, cmd: Sequence[str]) -> list[str]:
        if self._owner is None:  # not root: run as ourselves
            return list(cmd)
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", self._owner.pw_name, "--", *cmd]
        return ["su", self._owner.pw_name, "-s", "/bin/sh", "-c", shlex.join(cmd)]

    def _run_as_owner(
        self, cmd: Sequence[str], *, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._as_owner(cmd),
            cwd=self._base,  # the owner may not be able to enter our cwd
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )

    def _pg_ctl(self, args: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), *args]
        return self._run_as_owner(cmd, timeout=timeout)

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, self._owner.pw_uid, self._owner.pw_gid)

    def _init_cluster(self) -> None:
        t0 = time.monotonic()
        bindir = self.bindir
        parent = None
        if os.geteuid() == 0:
            name = os.environ.get("PGSERVER_USER", "postgres")
            try:
                self._owner = pwd.getpwnam(name)
            except KeyError:
                raise PgServerError(
                    f"running as root, but there is no user {name!r} to own the cluster "
                    "(initdb refuses root); install Debian's 'postgresql' package"
                ) from None
            parent = "/tmp"  # $TMPDIR may not be reachable by the owner
        # Short path: the Unix socket path must stay under ~107 bytes.
        self._base = Path(tempfile.mkdtemp(prefix="pgtest-", dir=parent))
        self._port = free_port()
        if not self._atexit_registered:
            atexit.register(self.close)
            self._atexit_registered = True
        try:
            os.chmod(self._base, 0o700)
            self._chown(self._base)
            self.socket_dir.mkdir(mode=0o700)
            self._chown(self.socket_dir)
            pwfile = self._base / "pwfile"
            pwfile.write_text(self.password + "\n")
            os.chmod(pwfile, 0o600)
            self._chown(pwfile)
            initdb = [
                str(bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                "-E", "UTF8", "--locale=C", "--no-sync",
                "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
            ]  # fmt: skip
            result = self._run_as_owner(initdb, timeout=120)
            pwfile.unlink()
            if result.returncode != 0:
                raise PgServerError(f"initdb failed (exit {result.returncode}):\n{result.stdout}")
            conf = self.data_dir / "postgresql.conf"
            with conf.open("a") as f:  # appending keeps the owner's ownership
                f.write("\n# added by tests/helpers/pgserver.py\ninclude 'pgserver.conf'\n")
            self._write_settings()
        except BaseException:
            self.close()
            raise
        self.init_seconds = time.monotonic() - t0

    def _write_settings(self) -> None:
        settings = {
            "listen_addresses": f"'{HOST}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "password_encryption": "'scram-sha-256'",
        }
        path = self.data_dir / "pgserver.conf"
        path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        self._chown(path)

"""A throw-away PostgreSQL cluster for the tests: ``initdb`` in a temp folder, a Unix socket in that folder (no
TCP port), ``pg_ctl start``/``stop``; one per test session, started by the first test that needs it.

The server binaries come from ``PATH`` or Debian's ``/usr/lib/postgresql/<version>/bin`` (``.ci/run`` installs
the ``postgresql`` package). PostgreSQL refuses to run as root: as root the cluster runs as the ``postgres``
user (``nobody`` where there is none) through ``runuser``. Where no cluster can start (no binaries, no psycopg,
initdb or start failing), the tests that need it skip with the reason.

Test modules use the session fixture :func:`postgres` (import it); processes the tests spawn find the cluster
through the environment (:data:`ENV`), so :func:`url` works in them too.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

import pytest

ENV = "S2V_TEST_POSTGRES"   # "<socket folder>" of the running cluster, for processes the tests spawn
SUPERUSER = "s2v"
MAINTENANCE_DB = "postgres"


class Unavailable(Exception):
    """No cluster can start here; the message is the reason the tests skip with."""


class Cluster:
    def __init__(self, root: Path, bindir: Path, run_as: str | None):
        self.root, self.bindir, self.run_as = root, bindir, run_as
        self.data = root / "data"
        self.log = root / "server.log"

    # ------------------------------------------------------------------ processes
    def _run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        prefix = ("runuser", "-u", self.run_as, "--") if self.run_as else ()
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=timeout)

    def _check(self, what: str, res: subprocess.CompletedProcess) -> None:
        if res.returncode != 0:
            tail = " ".join((res.stderr or res.stdout).split())[-300:]
            raise Unavailable(f"PostgreSQL {what} failed: {tail}")

    def init(self) -> None:
        self._check("initdb", self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                                        "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"))

    def start(self) -> None:
        # Small and quick: no TCP, little memory, no fsync (a process crash still loses nothing: writes reach
        # the OS at commit; only a machine crash would).
        opts = (f"-k {self.root} -c listen_addresses='' -c fsync=off -c shared_buffers=16MB -c max_connections=60 "
                "-c full_page_writes=off")
        self._check("start", self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                                       "-o", opts, "-w", "-t", "60", "start", timeout=90))

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clients disconnected, clean shutdown; ``immediate``: as if the server crashed."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ databases
    def url(self, db: str = MAINTENANCE_DB, schema: str | None = None) -> str:
        return url(db, schema, socket_dir=str(self.root))


def url(db: str = MAINTENANCE_DB, schema: str | None = None, socket_dir: str | None = None) -> str:
    """``postgresql://s2v@<socket folder>/<db>`` of the session's cluster (``schema``: its tables go there)."""
    socket_dir = socket_dir or os.environ.get(ENV) or str(cluster().root)
    out = f"postgresql://{SUPERUSER}@{quote(socket_dir, safe='')}/{db}"
    return out + (f"?options=-csearch_path%3D{schema}" if schema else "")


def create_database(name: str) -> str:
    """A new empty database on the session's cluster; its URL."""
    import psycopg

    assert re.fullmatch(r"[a-z_][a-z0-9_]*", name), name
    with psycopg.connect(url(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return url(name)


def schema_url(folder: Path) -> str:
    """A schema of its own for a test's ``folder`` (its tables go there), created if new; its URL."""
    import psycopg

    name = "t_" + hashlib.sha1(str(folder).encode()).hexdigest()[:16]
    with psycopg.connect(url(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {name}")
    return url(schema=name)


# ---------------------------------------------------------------------------------------------- the session's one
_cluster: Cluster | None = None
_failure: str | None = None


def _bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else None


def _start() -> Cluster:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise Unavailable("psycopg is not installed (pip install -e '.[serve]')") from None
    bindir = _bindir()
    if bindir is None or not (bindir / "initdb").exists():
        raise Unavailable("no PostgreSQL server binaries (apt-get install postgresql)")
    run_as = None
    if os.geteuid() == 0:  # initdb and postgres refuse root
        run_as = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
        if run_as is None or shutil.which("runuser") is None:
            raise Unavailable("running as root without a 'postgres'/'nobody' user and runuser to start PostgreSQL as")
    root = Path(tempfile.mkdtemp(prefix="s2v-pg-"))  # short: a socket path is limited to ~100 bytes
    root.chmod(0o755)
    if run_as:
        pw = pwd.getpwnam(run_as)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    c = Cluster(root, bindir, run_as)
    try:
        c.init()
        c.start()
    except (Unavailable, OSError, subprocess.TimeoutExpired) as exc:
        log = c.log.read_text(errors="replace")[-300:] if c.log.exists() else ""
        c.remove()
        raise Unavailable(f"{exc} {' '.join(log.split())}".strip()) from None
    return c


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def cluster() -> Cluster:
    """The session's cluster, started on first use; skips the calling test when none can start."""
    global _cluster, _failure
    if _cluster is None and _failure is None:
        try:
            _cluster = _start()
        except Unavailable as exc:
            _failure = str(exc)
        else:
            os.environ[ENV] = str(_cluster.root)
            atexit.register(_shutdown)  # also when the fixture's teardown never runs (an interrupted session)
    if _cluster is None:
        pytest.skip(f"no PostgreSQL server: {_failure}")
    return _cluster


def _shutdown() -> None:
    global _cluster
    if _cluster is not None:
        _cluster.remove()
        _cluster = None
        os.environ.pop(ENV, None)


@pytest.fixture(scope="session")
def postgres():
    """The session's throw-away cluster (skips where none can start); removed at the end of the session."""
    yield cluster()
    _shutdown()

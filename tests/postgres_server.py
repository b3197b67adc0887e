"""A throw-away PostgreSQL server for tests.

The server is created from scratch (``initdb``) in a temporary directory, listens
only on 127.0.0.1 on a free port, trusts every local connection and runs with
durability switched off (``fsync=off`` etc.), because nothing it stores outlives
the test session.

PostgreSQL refuses to run as root. When the tests run as root (as on our
machines and in CI) the server runs as the unprivileged ``postgres`` system user,
via ``setpriv`` (which ``exec``s, so the process we start *is* the postmaster and
can be signalled directly) or, failing that, ``runuser``. When the tests run as
an ordinary user, the server runs as that user.

Nothing is left running: ``stop()`` is idempotent, is also registered with
``atexit``, and where ``setpriv`` is used the postmaster gets a parent-death
signal (fast shutdown) if the Python process dies without cleaning up.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SERVER_USER = "postgres"
_DB_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None."""
    candidates: list[Path] = []
    env = os.environ.get("PG_BINDIR")
    if env:
        candidates.append(Path(env))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass

    def version_key(p: str) -> tuple[int, ...]:
        ver = Path(p).parent.name
        return tuple(int(x) for x in re.findall(r"\d+", ver)) or (0,)

    # Debian/Ubuntu layout; newest version first.
    candidates.extend(
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True)
    )
    candidates.extend(
        Path(p) for p in sorted(glob.glob("/usr/pgsql-*/bin"), key=version_key, reverse=True)
    )  # RHEL layout
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for d in candidates:
        if all(os.access(d / exe, os.X_OK) for exe in ("initdb", "postgres")):
            return d
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A private PostgreSQL cluster for the duration of a test session."""

    START_TIMEOUT_S = 30.0
    STOP_TIMEOUT_S = 15.0

    def __init__(self, base_dir: Path | None = None):
        # base_dir must be traversable by the server user. The default, a fresh
        # directory directly under /tmp, is; pytest's tmp_path (under a mode-700
        # /tmp/pytest-of-root) is not, when we run as root.
        self._own_base_dir = base_dir is None
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.port: int | None = None
        self.bindir: Path | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self._atexit_registered = False

    # ------------------------------------------------------------------ paths
    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "sock"

    @property
    def log_path(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "postgres.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ----------------------------------------------------------- availability
    @staticmethod
    def _user_switch() -> list[str] | None:
        """Command prefix that runs a command as the server user ([] = as ourselves)."""
        if os.geteuid() != 0:
            return []
        try:
            pw = pwd.getpwnam(SERVER_USER)
        except KeyError:
            return None
        if pw.pw_uid == 0:
            return None
        setpriv = shutil.which("setpriv")
        if setpriv:
            return [
                setpriv,
                f"--reuid={pw.pw_uid}",
                f"--regid={pw.pw_gid}",
                "--init-groups",
                "--reset-env",
                "--pdeathsig=INT",  # fast shutdown if our process dies uncleanly
                "--",
            ]
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", SERVER_USER, "--"]
        return None

    @staticmethod
    def available() -> tuple[bool, str]:
        if _find_bindir() is None:
            return False, (
                "PostgreSQL server binaries (initdb, postgres) not found "
                "(looked at $PG_BINDIR, pg_config --bindir, /usr/lib/postgresql/*/bin, PATH)"
            )
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(SERVER_USER)
            except KeyError:
                return False, f"running as root and there is no unprivileged {SERVER_USER!r} user to run the server"
            if pw.pw_uid == 0:
                return False, f"running as root and the {SERVER_USER!r} user is uid 0"
            if PostgresServer._user_switch() is None:
                return False, "running as root and neither setpriv nor runuser is available"
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            return False, "psycopg2 is not installed"
        return True, ""

    # -------------------------------------------------------------- lifecycle
    def _run_as_server_user(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        prefix = self._user_switch()
        assert prefix is not None
        return subprocess.run(prefix + argv, cwd=self.base_dir, capture_output=True, text=True, **kw)

    def _prepare_base_dir(self) -> None:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="dpnas-pg-", dir="/tmp"))
        else:
            self.base_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base_dir, 0o755)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self.log_path.touch()
        if os.geteuid() == 0:
            pw = pwd.getpwnam(SERVER_USER)
            for p in (self.base_dir, self.socket_dir, self.log_path):
                os.chown(p, pw.pw_uid, pw.pw_gid)

    def _initdb(self) -> None:
        assert self.bindir is not None
        res = self._run_as_server_user(
            [
                str(self.bindir / "initdb"),
                "-D", str(self.data_dir),
                "-U", "postgres",
                "-A", "trust",
                "-E", "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            timeout=120,
        )
        if res.returncode != 0:
            raise RuntimeError(f"initdb failed (rc={res.returncode}):\n{res.stdout}\n{res.stderr}")
        # Only loopback TCP and the private unix socket, everyone trusted.
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )

    def _server_argv(self, port: int) -> list[str]:
        assert self.bindir is not None
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "wal_level": "minimal",
            "max_wal_senders": "0",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        for k, v in settings.items():
            argv += ["-c", f"{k}={v}"]
        return argv

    def _log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError as e:
            return f"<could not read {self.log_path}: {e}>"

    def _wait_ready(self, deadline: float) -> None:
        import psycopg2

        assert self._proc is not None
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with rc={self._proc.returncode} during start-up; log:\n{self._log_tail()}"
                )
            try:
                conn = psycopg2.connect(
                    host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", connect_timeout=2
                )
                conn.close()
                return
            except psycopg2.OperationalError as e:
                last_err = e
                time.sleep(0.05)
        raise RuntimeError(
            f"postgres did not accept connections on 127.0.0.1:{self.port} within "
            f"{self.START_TIMEOUT_S:.0f}s (last error: {last_err}); log:\n{self._log_tail()}"
        )

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("server already started")
        ok, reason = self.available()
        if not ok:
            raise RuntimeError(f"cannot start PostgreSQL: {reason}")
        t0 = time.monotonic()
        self.bindir = _find_bindir()
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            self._prepare_base_dir()
            self._initdb()
            # The port is free when we pick it, but might be taken before postgres
            # binds it; try a few ports.
            for attempt in range(3):
                self.port = _free_port()
                self._launch()
                try:
                    self._wait_ready(time.monotonic() + self.START_TIMEOUT_S)
                    break
                except RuntimeError:
                    exited = self._proc.poll() is not None
                    if attempt < 2 and exited and "Address already in use" in self._log_tail():
                        self._reap()
                        continue
                    raise
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0

    def _launch(self) -> None:
        """Start the postmaster on the existing data directory and self.port."""
        self._log_file = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            self._user_switch() + self._server_argv(self.port),
            cwd=self.base_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # keep Ctrl-C in the terminal from reaching it
        )

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server (fast shutdown: every session is closed) and start it again on the same data
        directory and port, after `down_s` seconds down: what clients see when a server restarts."""
        if self._proc is None:
            raise RuntimeError("server not running")
        self._reap()
        time.sleep(down_s)
        self._launch()
        self._wait_ready(time.monotonic() + self.START_TIMEOUT_S)

    def _reap(self) -> None:
        """Stop the postmaster (fast, then immediate, then kill) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # With setpriv the process we started is the postmaster; with runuser
            # it is runuser's, so signal the postmaster named in postmaster.pid.
            postmaster = self._postmaster_pid() or proc.pid
            for sig, timeout in (
                (signal.SIGINT, self.STOP_TIMEOUT_S),  # fast shutdown
                (signal.SIGQUIT, 5.0),  # immediate shutdown
                (signal.SIGKILL, 5.0),
            ):
                # runuser itself exits once the postmaster has; kill it only last.
                targets = {postmaster, proc.pid} if sig == signal.SIGKILL else {postmaster}
                for pid in targets:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                try:
                    proc.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first.strip())
        except (OSError, ValueError, AssertionError):
            return None

    def stop(self) -> None:
        """Shut the server down and remove its files. Safe to call repeatedly."""
        self._reap()
        if self._own_base_dir and self.base_dir is not None and self.base_dir.exists():
            shutil.rmtree(self.base_dir, ignore_errors=True)
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    def __enter__(self) -> "PostgresServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------- use
    def url(self, dbname: str = "postgres") -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        if self._proc is None:
            raise RuntimeError("server not running")
        return psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname)

    def create_password_role(self, name: str, password: str, dbname: str) -> None:
        """A login role that owns `dbname` and must give its password (SCRAM) over TCP: every other role is
        still trusted."""
        for ident in (name, dbname):
            if not _DB_NAME_RE.match(ident):
                raise ValueError(f"invalid name {ident!r}")
        conn = self.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"CREATE ROLE \"{name}\" LOGIN PASSWORD %s", (password,))
                cur.execute(f'ALTER DATABASE "{dbname}" OWNER TO "{name}"')
                hba = self.data_dir / "pg_hba.conf"  # the first matching line wins
                hba.write_text(f"host all {name} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
                cur.execute("SELECT pg_reload_conf()")
        finally:
            conn.close()
        self._wait_password_required(name, dbname)

    def _wait_password_required(self, name: str, dbname: str) -> None:
        # the reload is asynchronous: wait until a connection without the password is refused
        import psycopg2

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                psycopg2.connect(host="127.0.0.1", port=self.port, user=name, dbname=dbname, password="").close()
            except psycopg2.OperationalError:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the server still lets {name!r} in without a password")

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        if not _DB_NAME_RE.match(name):
            raise ValueError(f"invalid database name {name!r} (use [a-z_][a-z0-9_]*, at most 63 chars)")
        conn = self.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

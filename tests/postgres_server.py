"""A throwaway PostgreSQL server for tests: initdb in a temporary directory, listening on 127.0.0.1 only.

``initdb`` refuses to run as root, so as root the server runs as the ``postgres`` system user (through
``runuser``) in a directory chowned to it; as any other user it runs as that user. The server uses trust
authentication (it listens on the loopback address and a private socket directory only) and is stopped,
and its directory removed, when the context manager exits.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")


def find_postgres_bindir() -> Path | None:
    """The directory of the newest PostgreSQL server binaries (initdb, pg_ctl, postgres), or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name)
                        if Path(d).parent.name.isdigit() else 0, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for directory in candidates:
        if all(os.access(Path(directory) / name, os.X_OK) for name in SERVER_PROGRAMS):
            return Path(directory)
    return None


def why_unavailable() -> str | None:
    """Why no server can be started here (a reason to skip), or None when one can."""
    if find_postgres_bindir() is None:
        return ("no PostgreSQL server binaries (initdb, pg_ctl, postgres) found in /usr/lib/postgresql/*/bin "
                "or on PATH; install Debian's postgresql package")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no 'postgres' system user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root without runuser to start the server as the 'postgres' user"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """A private PostgreSQL server; ``with PostgresServer() as server: server.create_database()``."""

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_postgres_bindir()
        if self.bindir is None:
            raise RuntimeError(why_unavailable())
        self.port = free_port()
        self.directory: Path | None = None
        self._databases = 0

    def _run(self, *args: str) -> None:
        """Run a server program as the server's user; a failure raises with its output."""
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        result = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    def start(self) -> PostgresServer:
        """initdb and start the server; returns self."""
        self.directory = Path(tempfile.mkdtemp(prefix="rlhfkit-postgres-"))
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.directory, account.pw_uid, account.pw_gid)
        data = self.directory / "data"
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync",
                  "-E", "UTF8", "--locale=C")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.directory} -c fsync=off -c max_connections=200"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(self.directory / "log"),
                  "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        """Stop the server at once and remove its directory."""
        if self.directory is None:
            return
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.directory / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL (psycopg 3 driver) of a database on this server."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """Create a new, empty database and return its URL."""
        import psycopg

        self._databases += 1
        name = f"test_{self._databases}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

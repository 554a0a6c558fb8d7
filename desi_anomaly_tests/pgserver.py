"""A throwaway PostgreSQL server for tests: a fresh cluster in a temporary folder, on 127.0.0.1.

Uses the server binaries of the Debian ``postgresql`` package (``/usr/lib/postgresql/*/bin``) or
those on PATH. PostgreSQL refuses to run as root, so under root the cluster belongs to and runs as
the ``postgres`` user (created by the package) or ``nobody``. The server listens on 127.0.0.1 only
(TCP with password authentication) plus a Unix socket inside its own folder.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"


def find_bin_dir() -> Path | None:
    """The folder of ``initdb``/``pg_ctl``: the newest Debian install, else PATH; None if absent."""
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def _run_as() -> str | None:
    """The user to run the server as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    """A running throwaway server; ``stop()`` shuts it down and deletes its folder."""

    bin_dir: Path
    root: Path
    port: int
    user: str
    password: str
    db_name: str
    run_as: str | None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{HOST}:{self.port}/{self.db_name}"

    def dagster_storage_config(self) -> dict:
        """The ``storage: postgres:`` block of a dagster.yaml pointing at this server."""
        return {
            "postgres": {
                "postgres_db": {
                    "username": self.user,
                    "password": self.password,
                    "hostname": HOST,
                    "port": self.port,
                    "db_name": self.db_name,
                    # SQLAlchemy >= 2.1 maps plain postgresql:// to psycopg 3; dagster-postgres
                    # installs psycopg2.
                    "scheme": "postgresql+psycopg2",
                }
            }
        }

    def _cmd(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin_dir / name), *args],
            user=self.run_as,
            cwd=self.root,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def is_running(self) -> bool:
        status = self._cmd("pg_ctl", "-D", str(self.data_dir), "status", check=False)
        return status.returncode == 0

    def stop(self) -> None:
        """Fast shutdown (idempotent), then remove the cluster's folder."""
        if self.data_dir.exists():
            self._cmd("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_postgres(db_name: str = "dagster", user: str = "dagster") -> PostgresServer:
    """Initialise and start a fresh cluster with database ``db_name`` owned by ``user``.

    Raises FileNotFoundError when no PostgreSQL server binaries are installed.
    """
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    run_as = _run_as()
    # Under /tmp (not a root-only pytest folder) so that the server's user can reach it.
    root = Path(tempfile.mkdtemp(prefix="desi-anomaly-pg-", dir="/tmp"))
    server = PostgresServer(
        bin_dir, root, _free_port(), user, secrets.token_hex(12), db_name, run_as
    )
    try:
        if run_as is not None:
            entry = pwd.getpwnam(run_as)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        pwfile = root / "pwfile"
        pwfile.write_text(server.password + "\n")
        if run_as is not None:
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        pwfile.chmod(0o600)
        server._cmd(
            "initdb",
            "-D",
            str(server.data_dir),
            "-U",
            user,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--encoding=UTF8",
            "--no-instructions",
        )
        pwfile.unlink()
        options = f"-p {server.port} -k {root} -c listen_addresses={HOST}"
        log = root / "server.log"
        started = server._cmd(
            "pg_ctl", "-D", str(server.data_dir), "-l", str(log), "-o", options, "-w", "start",
            check=False,
        )  # fmt: skip
        if started.returncode != 0:
            text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {started.stderr}\n{text}")
        server._cmd("createdb", "-h", str(root), "-p", str(server.port), "-U", user, db_name)
    except BaseException:
        server.stop()
        raise
    return server

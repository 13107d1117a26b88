"""A real PostgreSQL for tests and benchmarks: Debian's postgresql-15, initdb in a temporary folder,
its own port on 127.0.0.1, stopped at the end. It can be killed (SIGKILL) and started again on the
same data, as a database that crashes and comes back."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

from eao_devtools.testkit.operator_process import free_port

POSTGRES_VERSION = "15"
BIN = Path(f"/usr/lib/postgresql/{POSTGRES_VERSION}/bin")
# initdb and postgres refuse to run as root: as root, they run as the package's postgres user.
SERVICE_USER = "postgres"
DEBIAN_PACKAGE = f"postgresql-{POSTGRES_VERSION}"


class PostgresError(RuntimeError):
    pass


def available() -> str | None:
    """None when a server can be started here, else why not."""
    if not (BIN / "postgres").is_file():
        return f"{DEBIAN_PACKAGE} is not installed (make system-packages)"
    return None


class PostgresServer:
    def __init__(self, root: Path, database: str = "agent") -> None:
        self.root = root
        self.data = root / "data"
        self.sockets = root / "sockets"
        self.port = free_port()
        self.database = database
        self.password = secrets.token_urlsafe(16)  # per server: loopback only, thrown away with it
        self.log = root / "postgres.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._user = pwd.getpwnam(SERVICE_USER) if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql://agent:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *command: str) -> None:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            stdin=subprocess.DEVNULL,
            user=self._user.pw_uid if self._user else None,
            env={**os.environ, "PGPASSWORD": self.password},
        )
        if result.returncode != 0:
            raise PostgresError(f"{' '.join(command)} failed: {result.stderr.strip() or result.stdout.strip()}")

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def init(self) -> PostgresServer:
        why_not = available()
        if why_not:
            raise PostgresError(why_not)
        self._own(self.root)
        self.root.chmod(0o755)
        self._own(self.sockets)
        password_file = self.root / "password"
        password_file.write_text(self.password)
        if self._user is not None:
            os.chown(password_file, self._user.pw_uid, self._user.pw_gid)
        self._run(str(BIN / "initdb"), "-D", str(self.data), "-U", "agent", "--auth=scram-sha-256",
                  f"--pwfile={password_file}", "--encoding=UTF8", "--no-instructions")  # fmt: skip
        password_file.unlink()
        self.start()
        try:
            self._run(
                str(BIN / "createdb"), "-h", str(self.sockets), "-p", str(self.port), "-U", "agent", self.database
            )
        except BaseException:
            self.stop()  # no server left behind by a failed start
            raise
        return self

    def start(self) -> None:
        self._process = subprocess.Popen(
            [str(BIN / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.sockets),
             "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200", "-c", "fsync=on"],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            user=self._user.pw_uid if self._user else None, start_new_session=True,
            env={**os.environ, "PGPASSWORD": self.password},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise PostgresError(f"postgres exited ({self._process.returncode}); see {self.log}")
            ready = subprocess.run(
                [str(BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True, check=False
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise PostgresError(f"postgres did not accept connections within 60 s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL, as a crash: no checkpoint, no clean shutdown."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=30)
        # Its children (backends, walwriter) go with the process group; wait for the port to free.
        deadline = time.monotonic() + 30
        while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            try:
                pid = int((self.data / "postmaster.pid").read_text().split()[0])
                os.kill(pid, 0)
            except (ProcessLookupError, ValueError, OSError):
                break
            time.sleep(0.1)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.init()

    def __exit__(self, *_: object) -> None:
        self.remove()

"""bench/runtime: req/s and latency of three servers on loopback, measured in the same run with wrk.

- ours: `agent-runtime serve`: bearer-token authentication, RBAC, an audited (fsynced) no-op
  operation; once with the audit log on disk and once on tmpfs, to show what fsync costs; and once
  with its state on PostgreSQL (Debian's postgresql-15 on loopback, as several replicas would
  share it: each request then checks revocations there) beside the embedded SQLite;
- bare aiohttp: a handler that returns the same JSON, nothing else;
- FastAPI + uvicorn[standard] (uvloop, httptools): a bare hello, the seed's stack.

    .venv/bin/python -m bench.runtime [--seconds 10] [--connections 16 64 256] [--rounds 3] [--profile flame.svg]

Needs wrk (Debian package `wrk`; `make bench-runtime` installs it). With --profile, py-spy (bench
extra) samples the first server of the table while wrk loads it, pausing it for each sample (which
slows that row), and writes a flame graph by thread (SVG; `--profile flame.txt` writes collapsed
stacks to grep instead). Also printed: our CPU per request split between the event loop's thread and
the others, the runtime's RSS at rest (after start-up and one login), its peak (a login's argon2
hash takes 64 MiB for a moment), and the PSS of it with its fork server and CPU workers under load:
the pod's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from agent_contract.config import RuntimeConfig
from agent_runtime.cli import main as runtime_cli
from agent_runtime.security.users import hash_line
from eao_devtools.testkit.operator_process import free_port
from eao_devtools.testkit.postgres import PostgresServer, available

BIN = Path(sys.executable).parent
PASSWORD = "bench-password-0123456789"
LUA = """wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def wait_listening(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/operations/ping", data=b"{}", timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token is an answer)
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port}")


def layout(directory: Path, data_dir: Path, sample_ratio: float) -> Path:
    runtime_cli(["init", str(directory), "--name", "bench-agent"])
    (directory / "users").write_text(hash_line("bench", ["operator"], PASSWORD) + "\n")
    config_file = directory / "config.yaml"
    data = RuntimeConfig.from_yaml(config_file.read_text()).model_dump(by_alias=True, mode="json", exclude_none=True)
    data["dataDir"] = str(data_dir)
    data["observability"] = {**data.get("observability", {}), "traceSampleRatio": sample_ratio}
    config_file.write_text(RuntimeConfig.model_validate(data).to_yaml())
    return config_file


def token(port: int) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/auth/login",
        data=json.dumps({"username": "bench", "password": PASSWORD}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return str(json.loads(response.read())["access_token"])


def _wrk_script(port: int, bearer: str, workdir: Path) -> tuple[Path, str]:
    script = workdir / "post.lua"
    script.write_text(LUA % bearer)
    return script, f"http://127.0.0.1:{port}/v1/operations/ping"


def warm_up(port: int, bearer: str, workdir: Path) -> None:
    """Two seconds of light load before a measured run: the server's caches filled and its first requests done."""
    script, url = _wrk_script(port, bearer, workdir)
    subprocess.run(["wrk", "-t1", "-c4", "-d2s", "-s", str(script), url], capture_output=True, check=True)


def run_wrk(port: int, bearer: str, seconds: int, connections: int, workdir: Path) -> dict[str, float]:
    script, url = _wrk_script(port, bearer, workdir)
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in output:
        raise RuntimeError(f"errors during the run:\n{output}")
    return {
        "requests": float(re.search(r"(\d+) requests in", output).group(1)),  # type: ignore[union-attr]
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        "p50": _ms(re.search(r"\s50%\s+([\d.]+\w+)", output).group(1)),  # type: ignore[union-attr]
        "p99": _ms(re.search(r"\s99%\s+([\d.]+\w+)", output).group(1)),  # type: ignore[union-attr]
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def serve(command: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )
    wait_listening(port)
    return process


def _check_state_backend(port: int, expected: str) -> None:
    """The server keeps its state where the row says (/readyz tells): a PostgreSQL row that ran on
    SQLite went unnoticed once, when ``serve --host`` dropped DATABASE_URL."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
        backend = json.loads(response.read())["checks"]["state"]["backend"]
    if backend != expected:
        raise RuntimeError(f"the server's state is on {backend}, not {expected}")


def _status_kib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return float(line.split()[1])
    return float("nan")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _tree_pss_mib(pid: int) -> float:
    """The proportional set size of a server and every process it started (the runtime's fork
    server and CPU workers): what its pod's memory holds, shared pages counted once."""
    total = 0
    for member in _descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total / 1024


def _cpu_seconds(pid: int, task: int | None = None) -> tuple[float, float]:
    """User and system CPU time of a process, all its threads (or of one of its threads)."""
    stat = Path(f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat")
    fields = stat.read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a server and every process it started (the runtime's audit
    appender, fork server and CPU workers), as long as they run."""
    user = system = 0.0
    for member in _descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            member_user, member_system = _cpu_seconds(member)
            user, system = user + member_user, system + member_system
    return user, system


class Row:
    """One server at one connection count. ``cpu_us``: the CPU time per request of the server and
    the processes it started, which
    a busy machine changes far less than req/s (wrk and other processes take turns on the cores);
    ``loop_us``: the (user, system) part of it spent by the main thread, which runs the event loop."""

    def __init__(
        self,
        wrk: dict[str, float],
        cpu_seconds: float,
        loop_seconds: tuple[float, float],
        rest_mib: float,
        peak_mib: float,
        pod_mib: float,
    ) -> None:
        self.rps, self.p50, self.p99 = wrk["rps"], wrk["p50"], wrk["p99"]
        self.cpu_us = cpu_seconds / wrk["requests"] * 1e6
        self.loop_us = (loop_seconds[0] / wrk["requests"] * 1e6, loop_seconds[1] / wrk["requests"] * 1e6)
        self.rest_mib, self.peak_mib, self.pod_mib = rest_mib, peak_mib, pod_mib


def load(
    process: subprocess.Popen[bytes], port: int, bearer: str, args: argparse.Namespace, workdir: Path, profile: bool
) -> dict[int, Row]:
    """wrk at each connection count against one running server; py-spy beside the first count."""
    rest = _status_kib(process.pid, "VmRSS") / 1024
    rows = {}
    for connections in args.connections:
        # First: the warm-up's CPU, counted against the measured run's requests, had made every
        # server's CPU a request look higher than it was, by the warm-up's share of the requests
        # (a fifth to two-fifths; until 5 December).
        warm_up(port, bearer, workdir)
        spy = None
        if profile:
            raw = args.profile.suffix != ".svg"
            spy = subprocess.Popen(
                # Pausing the process for each sample: without it, py-spy kept samples for 31 % of the run
                # of a loop thread that used 80 % of a core (measured), and the profile was mostly the
                # audit writer thread waiting on fsync.
                [str(BIN / "py-spy"), "record", "--threads", "--rate", "200", "--duration", str(args.seconds),
                 "--pid", str(process.pid), "--output", str(args.profile), "--format", "raw" if raw else "flamegraph"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            profile = False
        cpu_before, loop_before = _tree_cpu_seconds(process.pid), _cpu_seconds(process.pid, process.pid)
        wrk = run_wrk(port, bearer, args.seconds, connections, workdir)
        cpu_after, loop_after = _tree_cpu_seconds(process.pid), _cpu_seconds(process.pid, process.pid)
        rows[connections] = Row(
            wrk,
            sum(cpu_after) - sum(cpu_before),
            (loop_after[0] - loop_before[0], loop_after[1] - loop_before[1]),
            rest,
            _status_kib(process.pid, "VmHWM") / 1024,
            _tree_pss_mib(process.pid),
        )
        if spy is not None:
            spy.wait()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, nargs="+", default=[16], help="wrk connection counts, each a run")
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="every server measured this many times, in a rotated order; the median round of each is shown",
    )  # fmt: skip
    parser.add_argument("--profile", type=Path, help="write py-spy's flame graph of the first server here")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    rounds: dict[str, list[dict[int, Row]]] = {}
    postgres = None if available() else PostgresServer(Path(tempfile.mkdtemp(prefix="bench-pg-"))).init()
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp, contextlib.ExitStack() as cleanup:
        if postgres is not None:
            cleanup.callback(postgres.remove)
        workdir = Path(tmp)
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
        # (audit on disk or tmpfs, share of requests traced, state on PostgreSQL); spans are made
        # but not exported.
        variants = {
            OURS: (workdir, 0.1, False),
            "ours: audit on tmpfs, 10% traced": (shm, 0.1, False),
            OURS_TRACED: (shm, 1.0, False),
        }
        if postgres is not None:
            variants["ours: disk, 10% traced, PostgreSQL state"] = (workdir, 0.1, True)
        servers = [*variants, BARE, FASTAPI]
        for round_ in range(args.rounds):
            # Rotated: whatever the machine does at a given moment (PostgreSQL's start-up writes,
            # another process) does not always fall on the same server.
            for name in servers[round_ % len(servers) :] + servers[: round_ % len(servers)]:
                profile = round_ == 0 and name == OURS and args.profile is not None
                if name in variants:
                    parent, ratio, shared = variants[name]
                    data_dir = Path(tempfile.mkdtemp(prefix="bench-audit-", dir=parent))
                    config = layout(Path(tempfile.mkdtemp(prefix="agent-", dir=workdir)), data_dir, ratio)
                    port = free_port()
                    command = [str(BIN / "agent-runtime"), "serve", "--config", str(config), "--port", str(port),
                               "--host", "127.0.0.1"]  # fmt: skip
                    env = {"DATABASE_URL": postgres.url} if shared and postgres is not None else None
                    process = serve(command, port, env=env)
                    _check_state_backend(port, "postgres" if shared else "sqlite")
                    bearer = token(port)
                else:
                    data_dir, port = None, free_port()
                    process = serve(_baseline_command(name, port), port)
                    bearer = "unused"
                try:
                    rounds.setdefault(name, []).append(load(process, port, bearer, args, workdir, profile))
                finally:
                    process.terminate()
                    process.wait()
                if data_dir is not None:
                    shutil.rmtree(data_dir, ignore_errors=True)
    results = {name: _median(rounds[name], args.connections) for name in servers if name in rounds}
    report(results, args)
    return 0


def _baseline_command(name: str, port: int) -> list[str]:
    if name == BARE:
        return [str(BIN / "python"), "-m", "bench.servers.bare_aiohttp", str(port)]
    return [
        str(BIN / "uvicorn"), "bench.servers.fastapi_hello:app", "--port", str(port), "--loop", "uvloop",
        "--http", "httptools", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip


def _median(measured: list[dict[int, Row]], connections: list[int]) -> dict[int, Row]:
    """Per connection count, the round of median req/s (a real round, not a mix of rounds)."""
    return {
        c: sorted((rows[c] for rows in measured), key=lambda row: row.rps)[(len(measured) - 1) // 2]
        for c in connections
    }


OURS = "ours: audit on disk, 10% traced"
OURS_TRACED = "ours: audit on tmpfs, 100% traced"
BARE = "bare aiohttp handler"
FASTAPI = "FastAPI + uvicorn[standard] hello"


def report(results: dict[str, dict[int, Row]], args: argparse.Namespace) -> None:
    for connections in args.connections:
        bare = results[BARE][connections]
        print(
            f"\nwrk, 1 thread, {connections} connections, {args.seconds} s per server, loopback, {os.cpu_count()} cores;"
            f" each server's median of {args.rounds} rounds"
        )
        print(
            f"{'server':44}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'vs bare':>9}{'p99 added':>11}"
            f"{'CPU/req':>10}{'RSS rest':>10}{'peak':>8}{'all PSS':>9}"
        )
        for name, rows in results.items():
            row = rows[connections]
            print(
                f"{name:44}{row.rps:>9.0f}{row.p50:>9.2f}{row.p99:>9.2f}{row.rps / bare.rps:>8.2f}x"
                f"{row.p99 - bare.p99:>9.2f}ms{row.cpu_us:>8.0f}us{row.rest_mib:>7.0f}MiB{row.peak_mib:>5.0f}MiB{row.pod_mib:>6.0f}MiB"
            )
    first = args.connections[0]
    ours, bare, fastapi = results[OURS][first], results[BARE][first], results[FASTAPI][first]
    traced = results[OURS_TRACED][first]
    print(f"\nratios at {first} connections (issue 19's targets):")
    print(f"  ours / FastAPI hello      {ours.rps / fastapi.rps:5.2f}x  (target >= 1.0x)")
    print(f"  ours / bare aiohttp       {ours.rps / bare.rps:5.2f}x  (target >= 0.5x)")
    print(f"  ours p99 added            {ours.p99 - bare.p99:5.2f} ms (target < 2 ms)")
    print(f"  100% traced / bare        {traced.rps / bare.rps:5.2f}x  (target >= 0.3x)")
    print(
        f"  CPU per request           ours {ours.cpu_us:.0f} us, FastAPI hello {fastapi.cpu_us:.0f} us,"
        f" bare {bare.cpu_us:.0f} us (ours / FastAPI in CPU: {fastapi.cpu_us / ours.cpu_us:.2f}x)"
    )
    print(
        f"  ours' event-loop thread   {ours.loop_us[0]:.0f} us user + {ours.loop_us[1]:.0f} us system a request;"
        f" its other threads and processes (the audit appender, the span exporter) {ours.cpu_us - sum(ours.loop_us):.0f} us"
    )
    print(
        f"  ours peak RSS             {max(row.peak_mib for row in results[OURS].values()):5.0f} MiB, with its fork"
        f" server and workers {max(row.pod_mib for row in results[OURS].values()):.0f} MiB PSS (goal < 80 MiB a pod)"
    )
    if len(args.connections) > 1:
        growth = ", ".join(
            f"{c}: {results[OURS][c].rps:.0f} req/s p99 {results[OURS][c].p99:.1f} ms" for c in args.connections
        )
        print(f"  ours from {args.connections[0]} to {args.connections[-1]} connections: {growth}")
    if args.profile is not None:
        print(f"  flame graph of {OURS!r}: {args.profile}")


if __name__ == "__main__":
    sys.exit(main())

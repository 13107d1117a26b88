"""bench/runtime: req/s and latency of three servers on loopback, measured in the same run with wrk.

- ours: `agent-runtime serve`: bearer-token authentication, RBAC, an audited (fsynced) no-op
  operation; once with the audit log on disk and once on tmpfs, to show what fsync costs; and once
  with its state on PostgreSQL (Debian's postgresql-15 on loopback, as several replicas would
  share it: each request then checks revocations there) beside the embedded SQLite;
- bare aiohttp: a handler that returns the same JSON, nothing else;
- FastAPI + uvicorn[standard] (uvloop, httptools): a bare hello, the seed's stack.

    .venv/bin/python -m bench.runtime [--seconds 10] [--connections 16]

Needs wrk (Debian package `wrk`; `make bench-runtime` installs it).
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


def run_wrk(port: int, bearer: str, seconds: int, connections: int, workdir: Path) -> dict[str, float]:
    script = workdir / "post.lua"
    script.write_text(LUA % bearer)
    url = f"http://127.0.0.1:{port}/v1/operations/ping"
    subprocess.run(["wrk", "-t1", "-c4", "-d2s", "-s", str(script), url], capture_output=True, check=True)  # warm-up
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in output:
        raise RuntimeError(f"errors during the run:\n{output}")
    return {
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    results: dict[str, dict[str, float]] = {}
    postgres = None if available() else PostgresServer(Path(tempfile.mkdtemp(prefix="bench-pg-"))).init()
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp, contextlib.ExitStack() as cleanup:
        if postgres is not None:
            cleanup.callback(postgres.remove)
        workdir = Path(tmp)
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
        # (audit on disk or tmpfs, share of requests traced, state on PostgreSQL); spans are made
        # but not exported.
        variants = {
            "ours: audit on disk, 10% traced": (workdir / "data-disk", 0.1, False),
            "ours: audit on tmpfs, 10% traced": (Path(tempfile.mkdtemp(prefix="bench-audit-", dir=shm)), 0.1, False),
            "ours: audit on tmpfs, 100% traced": (Path(tempfile.mkdtemp(prefix="bench-audit-", dir=shm)), 1.0, False),
        }
        if postgres is not None:
            variants["ours: disk, 10% traced, PostgreSQL state"] = (workdir / "data-pg", 0.1, True)
        for index, (name, (data_dir, ratio, shared)) in enumerate(variants.items()):
            config = layout(workdir / f"agent-{index}", data_dir, ratio)
            port = free_port()
            process = serve(
                [
                    str(BIN / "agent-runtime"),
                    "serve",
                    "--config",
                    str(config),
                    "--port",
                    str(port),
                    "--host",
                    "127.0.0.1",
                ],
                port,
                env={"DATABASE_URL": postgres.url} if shared and postgres is not None else None,
            )
            try:
                results[name] = run_wrk(port, token(port), args.seconds, args.connections, workdir)
            finally:
                process.terminate()
                process.wait()
            shutil.rmtree(data_dir, ignore_errors=True)
        port = free_port()
        process = serve([str(BIN / "python"), "-m", "bench.servers.bare_aiohttp", str(port)], port)
        try:
            results["bare aiohttp handler"] = run_wrk(port, "unused", args.seconds, args.connections, workdir)
        finally:
            process.terminate()
            process.wait()
        port = free_port()
        command = [
            str(BIN / "uvicorn"),
            "bench.servers.fastapi_hello:app",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        process = serve(command, port)
        try:
            results["FastAPI + uvicorn[standard] hello"] = run_wrk(
                port, "unused", args.seconds, args.connections, workdir
            )
        finally:
            process.terminate()
            process.wait()

    bare = results["bare aiohttp handler"]
    print(
        f"\nwrk, 1 thread, {args.connections} connections, {args.seconds} s per server, loopback, {os.cpu_count()} cores"
    )
    print(f"{'server':44}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'vs bare':>9}{'p99 added':>11}")
    for name, row in results.items():
        print(
            f"{name:44}{row['rps']:>9.0f}{row['p50']:>9.2f}{row['p99']:>9.2f}{row['rps'] / bare['rps']:>8.2f}x{row['p99'] - bare['p99']:>9.2f}ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How GitOps tools read an EnterpriseAgent: Argo CD through our Lua health check (run by real Lua
interpreters from apt) and Flux through kstatus (the upstream library, built from hack/tools)."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eao_devtools.cluster import ensure_tools
from tests.helpers import ROOT

HEALTH_LUA = ROOT / "gitops" / "argocd" / "health.lua"
# Argo CD runs health checks in gopher-lua (Lua 5.1); 5.4 is what the issue asks for. Both must agree.
LUA_INTERPRETERS = ("lua5.1", "lua5.4")
# Sets the global `obj` as Argo CD does (from the Lua table constructor on stdin), runs the health
# script (its path is appended as a Lua string) and prints what it returned.
HARNESS = """
local compile = loadstring or load
obj = assert(compile("return " .. io.read("*a")))()
local hs = dofile(%s)
io.write(tostring(hs.status), "\\n", tostring(hs.message))
"""


@dataclass(frozen=True)
class Reading:
    status: str
    message: str


def to_lua(value: Any) -> str:
    """A JSON value as a Lua table constructor, the shape Argo CD hands its health scripts."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # Decimal escapes for everything but plain characters: valid in Lua 5.1 and 5.4 alike.
        return (
            '"'
            + "".join(c if c.isalnum() or c in " _-.:/" else "".join(f"\\{b:03d}" for b in c.encode()) for c in value)
            + '"'
        )
    if isinstance(value, list):
        return "{" + ", ".join(to_lua(item) for item in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{to_lua(str(k))}] = {to_lua(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"not a JSON value: {value!r}")


@functools.cache
def lua_interpreters() -> tuple[str, ...]:
    found = tuple(path for name in LUA_INTERPRETERS if (path := shutil.which(name)) is not None)
    assert found, f"none of {LUA_INTERPRETERS} is installed; `make test` installs them from Debian's packages"
    return found


def argocd_health(agent: dict[str, Any], script: Path = HEALTH_LUA) -> Reading:
    """Argo CD's health of ``agent``; every installed Lua must give the same answer."""
    readings = set()
    for lua in lua_interpreters():
        result = subprocess.run(
            [lua, "-e", HARNESS % to_lua(script.as_posix())],
            input=to_lua(agent),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, f"{lua} failed on the health check: {result.stderr}"
        status, _, message = result.stdout.partition("\n")
        readings.add(Reading(status, message))
    assert len(readings) == 1, f"Lua interpreters disagree: {readings}"
    return readings.pop()


def kstatus(agent: dict[str, Any]) -> Reading:
    """kstatus' reading of ``agent`` (what Flux's health checks and `flux` wait on)."""
    result = subprocess.run(
        [str(ensure_tools() / "kstatus")],
        input=json.dumps(agent) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, f"kstatus failed: {result.stderr}"
    reading = json.loads(result.stdout)
    assert not reading.get("error"), reading["error"]
    return Reading(reading["status"], reading["message"])


def assert_gitops_reads(agent: dict[str, Any], argo: str, flux: str) -> None:
    """Argo CD (our health check) and Flux (kstatus) read ``agent`` as ``argo`` and ``flux``."""
    readings = (argocd_health(agent), kstatus(agent))
    assert (readings[0].status, readings[1].status) == (argo, flux), (readings, agent.get("status"))

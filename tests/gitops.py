"""How GitOps tools read an EnterpriseAgent: Argo CD through our Lua health check (run by real Lua
interpreters from apt) and Flux through kstatus (the upstream library, built from hack/tools)."""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eao_devtools.cluster import ensure_tools
from tests.helpers import ROOT

HEALTH_LUA = ROOT / "gitops" / "argocd" / "health.lua"
ACTIONS_DIR = ROOT / "gitops" / "argocd" / "actions"
DISCOVERY_LUA = ACTIONS_DIR / "discovery.lua"
# Agents as the API server returned them during the e2e rollouts (tests/cluster/test_rollout.py), kept
# for the unit tests of the actions; `EAO_RECORD_AGENTS=1 pytest tests/cluster/test_rollout.py -k argocd`
# records them again.
RECORDED_AGENTS = ROOT / "tests" / "unit" / "argocd_agents"
# The resource actions we ship, each in ACTIONS_DIR/<name>.lua, one per `kubectl ea` verb that changes an agent.
ACTIONS = ("promote", "abort", "retry", "undo")
# Argo CD runs health checks and actions in gopher-lua (Lua 5.1); 5.4 is what the issue asks for. Both
# must agree.
LUA_INTERPRETERS = ("lua5.1", "lua5.4")
# Runs one script as Argo CD does and prints what it returned as JSON. Argo CD's VM opens only the base,
# package and table libraries and a "safe" os (time and date): no string library, so no string methods
# either, and no io. The script runs in such an environment, with the global `obj` built from the Lua
# table constructor on stdin and os.date pinned to one moment (so every interpreter sees the same
# clock). A Lua error raised by the script exits 3 with its message on stderr. Prefixed with the
# locals `script` (its path) and `moment` (seconds since the epoch).
HARNESS = r"""
local compile = loadstring or load
local object = assert(compile("return " .. io.read("*a")))()
local handle = assert(io.open(script))
local source = handle:read("*a")
handle:close()
local real_date, format, gsub, byte, floor = os.date, string.format, string.gsub, string.byte, math.floor
local env = {
  obj = object, assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs, pcall = pcall,
  rawequal = rawequal, rawget = rawget, rawset = rawset, select = select, setmetatable = setmetatable,
  getmetatable = getmetatable, tonumber = tonumber, tostring = tostring, type = type,
  unpack = unpack or table.unpack, xpcall = xpcall, _VERSION = _VERSION,
  table = { concat = table.concat, insert = table.insert, remove = table.remove, sort = table.sort },
  os = { time = function(t) return t and os.time(t) or moment end,
         date = function(f, t) return real_date(f, t or moment) end },
}
env._G = env
local chunk
if setfenv then
  chunk = assert(loadstring(source, "=" .. script))
  setfenv(chunk, env)
else
  chunk = assert(load(source, "=" .. script, "t", env))
end
local strings = getmetatable("")
local methods = strings.__index
strings.__index = nil
local ok, result = pcall(chunk)
strings.__index = methods
if not ok then
  io.stderr:write(tostring(result))
  os.exit(3)
end

-- JSON as Argo CD's encoder (gopher-json) writes it: an empty table is an empty array.
local function encode(value)
  local kind = type(value)
  if kind == "nil" then
    return "null"
  elseif kind == "boolean" then
    return tostring(value)
  elseif kind == "number" then
    if value == floor(value) and value > -2^53 and value < 2^53 then
      return format("%d", value)
    end
    return format("%.17g", value)
  elseif kind == "string" then
    local escaped = gsub(value, '[%c"\\]', function(c) return format("\\u%04x", byte(c)) end)
    return '"' .. escaped .. '"'
  elseif kind == "table" then
    local count, parts = 0, {}
    for _ in pairs(value) do
      count = count + 1
    end
    if count == 0 then
      return "[]"
    end
    if count == #value then
      for i = 1, count do
        parts[i] = encode(value[i])
      end
      return "[" .. table.concat(parts, ",") .. "]"
    end
    for key, item in pairs(value) do
      assert(type(key) == "string", "a table mixing array and object keys")
      parts[#parts + 1] = encode(key) .. ":" .. encode(item)
    end
    return "{" .. table.concat(parts, ",") .. "}"
  end
  error("cannot encode a " .. kind)
end
io.write(encode(result))
"""


@dataclass(frozen=True)
class Reading:
    status: str
    message: str


class ActionRefusedError(Exception):
    """The script raised a Lua error: Argo CD shows its message and changes nothing."""


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


def run_argocd_lua(script: Path, agent: dict[str, Any], moment: int | None = None) -> Any:
    """What ``script`` returns for ``obj`` = ``agent`` in Argo CD's Lua environment, as JSON; every
    installed Lua must return the same. ActionRefusedError when the script raises an error."""
    moment = int(time.time()) if moment is None else moment
    answers: set[str] = set()
    for lua in lua_interpreters():
        result = subprocess.run(
            [lua, "-e", f"local script, moment = {to_lua(script.as_posix())}, {moment}\n{HARNESS}"],
            input=to_lua(agent),
            capture_output=True,
            encoding="utf-8",
            timeout=30,
            check=False,
        )
        assert result.returncode in (0, 3), f"{lua} failed on {script.name}: {result.stderr}"
        if result.returncode == 3:
            answers.add(f"error: {result.stderr}")
        else:  # tables come out in any key order
            answers.add(json.dumps(json.loads(result.stdout), sort_keys=True))
    assert len(answers) == 1, f"Lua interpreters disagree on {script.name}: {answers}"
    answer = answers.pop()
    if answer.startswith("error: "):
        raise ActionRefusedError(answer.removeprefix("error: "))
    return json.loads(answer)


def argocd_health(agent: dict[str, Any], script: Path = HEALTH_LUA) -> Reading:
    """Argo CD's health of ``agent``; every installed Lua must give the same answer."""
    hs = run_argocd_lua(script, agent)
    return Reading(str(hs.get("status")), str(hs.get("message")))


def argocd_actions(agent: dict[str, Any]) -> dict[str, bool]:
    """The actions Argo CD offers for ``agent``: name -> enabled (Argo CD reads `disabled`, a boolean,
    and takes anything else as enabled)."""
    found = run_argocd_lua(DISCOVERY_LUA, agent)
    if found == []:  # an empty table: no actions
        return {}
    assert isinstance(found, dict), found
    return {name: not (isinstance(spec, dict) and spec.get("disabled") is True) for name, spec in found.items()}


def argocd_action(agent: dict[str, Any], name: str, moment: int | None = None) -> dict[str, Any]:
    """The object the action ``name`` returns for ``agent``, as Argo CD reads it back (an empty table
    that was an object in ``agent`` stays an object). ActionRefusedError when the action refuses."""
    assert name in ACTIONS, name
    returned = run_argocd_lua(ACTIONS_DIR / f"{name}.lua", agent, moment)
    assert isinstance(returned, dict), f"{name} returned {returned!r}, not the object"
    cleaned: dict[str, Any] = _clean_object(returned, agent)
    return cleaned


def argocd_action_patch(agent: dict[str, Any], name: str, moment: int | None = None) -> dict[str, Any]:
    """The merge patch Argo CD sends when ``name`` runs on the live ``agent``: the JSON merge patch from
    the live object to what the action returned (jsonpatch.CreateMergePatch in Argo CD's server)."""
    return merge_patch(agent, argocd_action(agent, name, moment))


def _clean_object(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """Argo CD's cleanReturnedObj: Lua cannot tell an empty object from an empty array."""
    cleaned = dict(new)
    for key, value in new.items():
        if key not in old:
            continue
        if isinstance(value, dict) and isinstance(old[key], dict):
            cleaned[key] = _clean_object(value, old[key])
        elif isinstance(value, list) and isinstance(old[key], dict) and not value:
            cleaned[key] = old[key]
        elif isinstance(value, list) and isinstance(old[key], list):
            cleaned[key] = _clean_array(value, old[key])
    return cleaned


def _clean_array(new: list[Any], old: list[Any]) -> list[Any]:
    """Argo CD's cleanReturnedArray."""
    cleaned = list(new)
    for i, value in enumerate(new[: len(old)]):
        if isinstance(value, dict) and isinstance(old[i], dict):
            cleaned[i] = _clean_object(value, old[i])
        elif isinstance(value, list) and isinstance(old[i], list):
            cleaned[i] = _clean_array(value, old[i])
    return cleaned


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The RFC 7386 merge patch that turns ``old`` into ``new``."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif isinstance(value, dict) and isinstance(old[key], dict):
            if nested := merge_patch(old[key], value):
                patch[key] = nested
        elif value != old[key] or type(value) is not type(old[key]):
            patch[key] = value
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: ``patch`` applied to ``target`` (neither is changed)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


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


def record_agent(name: str, agent: dict[str, Any]) -> None:
    """With EAO_RECORD_AGENTS set, keep ``agent`` (as the API server returned it, less managedFields)
    as RECORDED_AGENTS/<name>.json."""
    if not os.environ.get("EAO_RECORD_AGENTS"):
        return
    metadata = {k: v for k, v in agent["metadata"].items() if k != "managedFields"}
    RECORDED_AGENTS.mkdir(exist_ok=True)
    (RECORDED_AGENTS / f"{name}.json").write_text(json.dumps({**agent, "metadata": metadata}, indent=2) + "\n")


def recorded_agent(name: str) -> dict[str, Any]:
    agent: dict[str, Any] = json.loads((RECORDED_AGENTS / f"{name}.json").read_text())
    return agent

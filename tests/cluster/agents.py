"""Helpers for tests that drive EnterpriseAgents through kubectl, as a user would (the manifests
themselves come from eao_devtools.testkit.agents, which the benchmarks use too)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eao_devtools.testkit.kube import Kube


def wait_until(
    condition: Callable[[], Any], timeout: float = 60, interval: float = 0.25, what: str = "condition"
) -> Any:
    """Polls ``condition()`` until it returns something truthy, and returns it."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)


def apply(kube: Kube, manifest: dict[str, Any]) -> None:
    kube.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))


def get(kube: Kube, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    result = kube.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    obj: dict[str, Any] = json.loads(result.stdout)
    return obj


def wait_phase(kube: Kube, namespace: str, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def current() -> dict[str, Any] | None:
        agent = get(kube, namespace, "ea", name)
        status = (agent or {}).get("status") or {}
        generation = (agent or {}).get("metadata", {}).get("generation")
        seen.update(generation=generation, status=status)
        if status.get("phase") == phase and status.get("observedGeneration") == generation:
            return agent
        return None

    try:
        result: dict[str, Any] = wait_until(current, timeout, what=f"{namespace}/{name} phase {phase}")
    except AssertionError as error:
        raise AssertionError(f"{error}; last seen: {json.dumps(seen)}") from None
    return result


def condition(agent: dict[str, Any], type_: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in agent["status"]["conditions"] if c["type"] == type_)
    return found


def children(kube: Kube, namespace: str, name: str) -> dict[str, list[dict[str, Any]]]:
    """The agent's children by kind, found by the instance label."""
    kinds = "deployments,services,configmaps,secrets,serviceaccounts,poddisruptionbudgets,horizontalpodautoscalers,networkpolicies"
    listing = json.loads(
        kube.kubectl("get", kinds, "-n", namespace, "-l", f"app.kubernetes.io/instance={name}", "-o", "json").stdout
    )
    result: dict[str, list[dict[str, Any]]] = {}
    for item in listing["items"]:
        result.setdefault(item["kind"], []).append(item)
    return result


def operator_writes(audit_log: Path, namespace: str) -> list[str]:
    """The operator's write requests in one namespace, from the API server's audit log."""
    writes = []
    for line in audit_log.read_text().splitlines():
        event = json.loads(line)
        ref = event.get("objectRef") or {}
        if ref.get("namespace") == namespace and str(event.get("userAgent", "")).startswith(
            "enterprise-agent-operator/"
        ):
            writes.append(
                f"{event['verb']} {ref.get('resource')}/{ref.get('name', '')} {ref.get('subresource', '')}".strip()
            )
    return writes

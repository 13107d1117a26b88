"""Shared test helpers: repository paths and example loading."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from agent_operator.manifest import load_agents
from agent_operator.reconcile import ChildKey, Observed, admit
from agent_operator.spec import EnterpriseAgent

if TYPE_CHECKING:  # only named in annotations: importing helpers does not import kopf
    from agent_operator.controller import Controller

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BAD = sorted((ROOT / "tests" / "bad").glob("*.yaml"))
CRD_FILE = ROOT / "crds" / "enterpriseagents.agents.enterprise.io.yaml"
KUBERNETES_VERSION = "1.34.0"  # the version the local control plane runs (hack/controlplane/go.mod)


def example_document(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    return document


def example_agent(name: str) -> EnterpriseAgent:
    path = ROOT / "examples" / f"{name}.yaml"
    (agent,) = load_agents(path.read_text(), str(path))
    return agent


def header_values(path: Path, key: str) -> list[str]:
    """Values of ``# key: value`` comment lines at the top of a test manifest."""
    values = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        name, _, value = line.lstrip("# ").partition(":")
        if name.strip() == key:
            values.append(value.strip())
    return values


def served(name: str, status: dict[str, Any] | None = None, generation: int = 1, uid: str = "u1") -> dict[str, Any]:
    """An example agent as the API server would return it, with this status."""
    document = example_document(name)
    document["metadata"] = {**document["metadata"], "namespace": "default", "generation": generation, "uid": uid}
    return {**document, "status": status or {}}


def observe(
    body: dict[str, Any],
    children: dict[ChildKey, Any] | None = None,
    **fields: Any,
) -> Observed:
    """What the controller would observe of ``body``, with these children (and other fields)."""
    return Observed(body=body, admission=admit(body), children=children or {}, **fields)


def rolled_out(children: dict[Any, dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """The children as the cluster shows them once their Deployments have rolled out."""
    done = dict(children)
    for key, child in children.items():
        if child["kind"] == "Deployment":
            replicas = child["spec"]["replicas"]
            done[key] = {
                **child,
                "metadata": {**child["metadata"], "generation": 1},
                "status": {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                           "readyReplicas": replicas, "availableReplicas": replicas},
            }  # fmt: skip
    return done


def queued(controller: Controller) -> bool:
    return len(controller.queue) > 0


async def drain(controller: Controller) -> set[Any]:
    """Takes every queued agent off the queue (as done, without reconciling it); returns their keys."""
    taken = set()
    while queued(controller):
        key = await controller.queue.get()
        taken.add(key)
        controller.queue.done(key)
    return taken

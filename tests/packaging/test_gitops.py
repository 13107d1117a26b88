"""The Argo CD health check and kstatus (Flux) on statuses from the operator's own reconcile code.

The live statuses of a real rollout (Suspended while awaiting approval, Degraded after an abort) are
read the same way in tests/cluster/test_rollout.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from agent_operator import conditions as cond
from agent_operator.manifest import FieldError
from agent_operator.reconcile import Plan, child_key, reconcile, stalled_plan
from agent_operator.spec import Phase
from tests.gitops import HEALTH_LUA, argocd_health, kstatus, to_lua
from tests.helpers import ROOT, example_document, observe, rolled_out, served

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def as_served(status: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    """The example agent as the API server would return it with this status."""
    agent = example_document("minimal")
    agent["metadata"] = {**agent["metadata"], "generation": generation, "uid": "u1"}
    return {**agent, "status": status}


def _plan(body: dict[str, Any], children: dict[Any, Any] | None = None) -> Plan:
    return reconcile(observe(body, children), NOW, operator_namespace="ops")


def new_agent_status() -> dict[str, Any]:
    return _plan(served("minimal")).status_body()


def ready_status(**spec: Any) -> dict[str, Any]:
    body = served("minimal")
    body["spec"] = {**body["spec"], **spec}
    first = _plan(body)
    children = {child_key(c): c for c in first.apply}
    children = rolled_out(children)
    plan = _plan(body, children)
    assert plan.status.phase == Phase.READY
    return plan.status_body()


def shared_state_missing_status() -> dict[str, Any]:
    """Ready with three replicas and no spec.state.postgres: the SharedStateMissing warning is True."""
    status = ready_status(replicas=3)
    assert {"type": "SharedStateMissing", "status": "True"}.items() <= next(
        c for c in status["conditions"] if c["type"] == "SharedStateMissing"
    ).items()
    return status


def invalid_spec_status() -> dict[str, Any]:
    errors = [FieldError("spec.security.usersSecretRef.name", "Secret 'users' not found in namespace 'default'")]
    return stalled_plan(observe(served("minimal")), errors, cond.Reason.MISSING_REFERENCE, NOW).status_body()


def test_the_argocd_cm_patch_inlines_the_health_check_unchanged() -> None:
    patch = yaml.safe_load((ROOT / "gitops" / "argocd" / "argocd-cm-patch.yaml").read_text())
    inlined = patch["data"]["resource.customizations.health.agents.enterprise.io_EnterpriseAgent"]
    assert inlined == HEALTH_LUA.read_text()


@pytest.mark.parametrize(
    ("name", "agent", "argo", "flux"),
    [
        ("not yet seen by the operator", lambda: {**as_served({}), "status": None}, "Progressing", "Current"),
        ("created, children not ready", lambda: as_served(new_agent_status()), "Progressing", "InProgress"),
        ("ready", lambda: as_served(ready_status()), "Healthy", "Current"),
        ("ready, several replicas without shared state (a warning)", lambda: as_served(shared_state_missing_status()),
         "Healthy", "Current"),
        ("a newer generation not yet observed", lambda: as_served(ready_status(), generation=2), "Progressing",
         "InProgress"),
        ("a missing Secret (Stalled)", lambda: as_served(invalid_spec_status()), "Degraded", "Failed"),
    ],
)  # fmt: skip
def test_argocd_and_flux_read_the_operators_statuses(name: str, agent: Any, argo: str, flux: str) -> None:
    served = agent()
    assert argocd_health(served).status == argo, name
    if served.get("status") is not None:
        assert kstatus(served).status == flux, name


def test_the_health_message_says_why() -> None:
    degraded = argocd_health(as_served(invalid_spec_status()))
    assert degraded.message.startswith("MissingReference: spec.security.usersSecretRef.name")
    waiting = argocd_health(as_served(ready_status(), generation=7))
    assert waiting.message == "Waiting for the operator to observe generation 7"


@pytest.mark.parametrize(
    ("status", "health"),
    [
        ({}, "Progressing"),
        ({"conditions": []}, "Progressing"),
        ({"phase": "Ready"}, "Progressing"),  # no observedGeneration: not this generation's verdict
        ({"observedGeneration": 1, "conditions": [{"type": "Ready"}]}, "Progressing"),
        ({"observedGeneration": 1, "conditions": [{"type": "Degraded", "status": "True"}]}, "Degraded"),
        ({"observedGeneration": 1, "conditions": [{"type": "Stalled", "status": "True", "reason": ""}]}, "Degraded"),
        ({"observedGeneration": 1, "phase": "Paused"}, "Suspended"),
    ],
)
def test_odd_statuses_get_an_answer_not_an_error(status: dict[str, Any], health: str) -> None:
    """Hand-edited or half-written statuses: the script answers (a Lua error shows as Unknown in Argo CD)."""
    assert argocd_health(as_served(status)).status == health


def test_strings_reach_lua_intact() -> None:
    """The harness' JSON-to-Lua conversion itself: quotes, backslashes, newlines and non-ASCII survive."""
    message = 'quote "1 backslash \\ newline \n9 tab \t é ]] --[['  # an escape followed by a digit, too
    status = {"observedGeneration": 1, "phase": "Paused", "message": message, "conditions": []}
    assert argocd_health(as_served(status)).message == message
    assert to_lua([1, True, None]) == "{1, true, nil}"

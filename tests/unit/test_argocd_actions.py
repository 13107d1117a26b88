"""The Argo CD resource actions (gitops/argocd/actions/) against `kubectl ea`.

Agents come from real runs (tests/unit/argocd_agents/, recorded by the e2e tests in
tests/cluster/test_rollout.py), a few steps derived from them by changing the step alone, and the
operator's pure reconcile code. Every script runs under each installed Lua in Argo CD's environment
(no string library, a "safe" os), and the interpreters must agree (tests/gitops.py).
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from agent_operator import conditions as cond
from agent_operator import timefmt
from agent_operator.manifest import FieldError
from agent_operator.plugin import PluginError, abort_patch, promote_patch, retry_patch, undo_patch
from agent_operator.reconcile import reconcile, stalled_plan
from tests.gitops import (
    ACTIONS,
    ACTIONS_DIR,
    DISCOVERY_LUA,
    ActionRefusedError,
    apply_merge_patch,
    argocd_action,
    argocd_action_patch,
    argocd_actions,
    merge_patch,
    recorded_agent,
)
from tests.helpers import ROOT, observe, served

NOW = datetime(2026, 1, 1, tzinfo=UTC)
MOMENT = int(datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC).timestamp())  # the clock the scripts see
ABORT, RETRY, UNDO = "agents.enterprise.io/abort", "agents.enterprise.io/retry", "agents.enterprise.io/undo"
TOKEN = re.compile(r"^\d{8}T\d{6}\.\d{6}Z$")  # timefmt.compact, what `kubectl ea retry` writes


def _with_step(name: str, step: str, **rollout: Any) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        agent = recorded_agent(name)
        agent["status"]["rollout"] = {**agent["status"]["rollout"], **rollout, "step": step}
        return agent

    return build


def _auto(name: str) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        agent = recorded_agent(name)
        agent["spec"]["rollout"] = {**agent["spec"]["rollout"], "promotion": "Auto"}
        return agent

    return build


def _without_annotations(name: str) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        agent = recorded_agent(name)
        agent["metadata"].pop("annotations", None)
        return agent

    return build


def _without_status() -> dict[str, Any]:
    return {**recorded_agent("manual-ready"), "status": None}


def _created() -> dict[str, Any]:
    """A new agent whose children are not ready yet, from the pure reconcile entry."""
    return served("minimal", reconcile(observe(served("minimal")), NOW, operator_namespace="ops").status_body())


def _stalled() -> dict[str, Any]:
    errors = [FieldError("spec.security.usersSecretRef.name", "Secret 'users' not found in namespace 'default'")]
    plan = stalled_plan(observe(served("minimal")), errors, cond.Reason.MISSING_REFERENCE, NOW)
    return served("minimal", plan.status_body())


# (name, agent, the actions Argo CD offers enabled). Recorded: manual-*; the rest say how they differ.
AGENTS: list[tuple[str, Callable[[], dict[str, Any]], set[str]]] = [
    ("Ready, no rollout yet", lambda: recorded_agent("manual-ready"), set()),
    ("Manual, analysing the preview", lambda: recorded_agent("manual-analysis"), {"promote", "abort", "undo"}),
    ("Manual, Paused awaiting approval", lambda: recorded_agent("manual-paused"), {"promote", "abort", "undo"}),
    ("Manual, promoted and completed", lambda: recorded_agent("manual-promoted"), {"undo"}),
    ("aborted on request (Degraded)", lambda: recorded_agent("manual-aborted"), {"retry", "undo"}),
    (
        "Manual, Preview (the analysis step put back)",
        _with_step("manual-analysis", "Preview"),
        {"promote", "abort", "undo"},
    ),
    ("Manual, Promoting", _with_step("manual-paused", "Promoting"), {"abort", "undo"}),
    ("PostPromotion", _with_step("manual-promoted", "PostPromotion"), {"abort", "undo"}),
    (
        "aborted by a failed analysis",
        _with_step("manual-aborted", "Aborted", abortReason="AnalysisFailed"),
        {"retry", "undo"},
    ),
    ("Auto, awaiting its promotion delay", _auto("manual-paused"), {"abort", "undo"}),
    ("Auto, analysing", _auto("manual-analysis"), {"abort", "undo"}),
    ("Paused, no annotations at all", _without_annotations("manual-paused"), {"promote", "abort", "undo"}),
    ("aborted, no annotations at all", _without_annotations("manual-aborted"), {"retry", "undo"}),
    ("no status yet", _without_status, set()),
    ("created, children not ready (pure reconcile)", _created, set()),
    ("a missing Secret, Stalled (pure reconcile)", _stalled, set()),
]
IDS = [name for name, _, _ in AGENTS]


def kubectl_ea_patch(verb: str, agent: dict[str, Any]) -> dict[str, Any]:
    """The merge patch `kubectl ea <verb>` sends (its pure part); PluginError when it refuses."""
    if verb == "promote":
        return promote_patch(agent)
    if verb == "abort":
        return abort_patch(agent)
    token = timefmt.compact(datetime.fromtimestamp(MOMENT, UTC))
    return retry_patch(agent, token) if verb == "retry" else undo_patch(agent, token)


class _StrictLoader(yaml.SafeLoader):
    """Refuses a mapping with a key twice, as kustomize's kyaml and yamllint do (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = sorted({str(key) for key in keys if keys.count(key) > 1})
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {twice}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def test_the_argocd_cm_patch_inlines_the_actions_unchanged() -> None:
    patch = yaml.load((ROOT / "gitops" / "argocd" / "argocd-cm-patch.yaml").read_text(), Loader=_StrictLoader)  # noqa: S506
    inlined = yaml.safe_load(patch["data"]["resource.customizations.actions.agents.enterprise.io_EnterpriseAgent"])
    assert inlined["discovery.lua"] == DISCOVERY_LUA.read_text()
    definitions = {d["name"]: d["action.lua"] for d in inlined["definitions"]}
    assert definitions == {name: (ACTIONS_DIR / f"{name}.lua").read_text() for name in ACTIONS}
    assert sorted(p.name for p in ACTIONS_DIR.iterdir()) == sorted(["discovery.lua", *(f"{a}.lua" for a in ACTIONS)])


@pytest.mark.parametrize(("name", "agent", "enabled"), AGENTS, ids=IDS)
def test_discovery_offers_the_actions_the_status_allows(
    name: str, agent: Callable[[], dict[str, Any]], enabled: set[str]
) -> None:
    offered = argocd_actions(agent())
    assert set(offered) == set(ACTIONS), name  # every action is listed (greyed out when disabled)
    assert {action for action, on in offered.items() if on} == enabled, name


@pytest.mark.parametrize(("name", "agent", "enabled"), AGENTS, ids=IDS)
@pytest.mark.parametrize("verb", ACTIONS)
def test_each_action_changes_what_kubectl_ea_changes(
    verb: str, name: str, agent: Callable[[], dict[str, Any]], enabled: set[str]
) -> None:
    """Enabled: the object the action returns is the live one with `kubectl ea`'s patch applied, and
    nothing else. Disabled: `kubectl ea` refuses too, and so does the action, with the same words."""
    live = agent()
    before = copy.deepcopy(live)
    expected: dict[str, Any] | None = None
    refusal: PluginError | None = None
    try:
        expected = kubectl_ea_patch(verb, live)
    except PluginError as error:
        refusal = error
    if expected is None:
        assert verb not in enabled, f"{name}: kubectl ea {verb} refuses ({refusal}) but Argo CD offers it"
        with pytest.raises(ActionRefusedError) as refused:
            argocd_action(live, verb, MOMENT)
        assert str(refused.value).startswith(str(refusal).split(";")[0]), (refused.value, refusal)
    else:
        assert verb in enabled, f"{name}: kubectl ea {verb} acts but Argo CD offers it disabled"
        assert argocd_action(live, verb, MOMENT) == apply_merge_patch(live, expected)
    assert live == before  # the harness changed nothing it was given


def test_what_argo_cd_sends_for_each_action_on_a_recorded_agent() -> None:
    paused, aborted = recorded_agent("manual-paused"), recorded_agent("manual-aborted")
    revision = paused["status"]["previewRevision"]
    assert argocd_action_patch(paused, "promote") == {"spec": {"rollout": {"promote": revision}}}
    assert argocd_action_patch(paused, "abort") == {"metadata": {"annotations": {ABORT: revision}}}
    assert aborted["metadata"]["annotations"][ABORT] == aborted["status"]["previewRevision"]
    sent = argocd_action_patch(aborted, "retry", MOMENT)
    assert sent == {"metadata": {"annotations": {ABORT: None, RETRY: "20260304T050607.000000Z"}}}


def test_after_promotion_abort_names_the_newly_active_revision() -> None:
    post = _with_step("manual-promoted", "PostPromotion")()
    assert argocd_action_patch(post, "abort") == {
        "metadata": {"annotations": {ABORT: post["status"]["activeRevision"]}}
    }


def test_retry_writes_a_token_of_kubectl_eas_form_from_the_clock() -> None:
    before = int(time.time())
    token = argocd_action(recorded_agent("manual-aborted"), "retry")["metadata"]["annotations"][RETRY]
    assert TOKEN.match(token), token
    assert TOKEN.match(timefmt.compact(timefmt.now()))  # the form kubectl ea writes
    written = datetime.strptime(token, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC).timestamp()
    assert before <= written <= time.time()


def test_retry_is_a_new_request_for_the_operator() -> None:
    """The operator retries when the token differs from the one it served (status.rollout.retriedFor)."""
    aborted = recorded_agent("manual-aborted")
    token = argocd_action(aborted, "retry", MOMENT)["metadata"]["annotations"][RETRY]
    assert token != aborted["status"]["rollout"].get("retriedFor")


def test_merge_patch_round_trips() -> None:
    """The harness' own RFC 7386 helpers: a patch from old to new turns old into new."""
    old = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "e": {}}
    new = {"a": 1.5, "b": {"c": [1], "f": None}, "g": True}
    patch = merge_patch(old, new)
    assert patch == {"a": 1.5, "b": {"c": [1], "d": None, "f": None}, "e": None, "g": True}
    assert apply_merge_patch(old, patch) == {"a": 1.5, "b": {"c": [1]}, "g": True}


def test_undo_asks_the_operator_with_a_token_it_has_not_answered() -> None:
    """The action cannot read the previous spec (a ControllerRevision): it only asks, with a token."""
    promoted = recorded_agent("manual-promoted")
    sent = argocd_action_patch(promoted, "undo", MOMENT)
    assert sent == {"metadata": {"annotations": {UNDO: "20260304T050607.000000Z"}}}
    assert "spec" not in sent  # the operator sets the spec back, from what it recorded


@pytest.mark.parametrize(
    ("agent", "refusal"),
    [
        (lambda: recorded_agent("manual-ready"), "has no previous revision to go back to"),
        (_without_status, "has not served any revision yet"),
    ],
    ids=["first revision", "no status"],
)
def test_undo_with_nothing_to_go_back_to_is_refused_in_the_same_words(
    agent: Callable[[], dict[str, Any]], refusal: str
) -> None:
    live = agent()
    with pytest.raises(PluginError, match=refusal):
        undo_patch(live, "t")
    with pytest.raises(ActionRefusedError, match=refusal):
        argocd_action(live, "undo", MOMENT)

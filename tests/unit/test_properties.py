"""Property: any spec the models accept renders deterministically into valid objects, and the
CRD (schema and CEL) accepts it too, so the two validation layers agree."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent_operator.manifest import ManifestError, parse_agent
from agent_operator.render import RenderPlan, build_children
from agent_operator.spec import EnterpriseAgent
from tests.kube_schema import api_errors
from tests.unit.test_render import rendered_zeros
from tests.unit.test_render_validates import validate_strict

names = st.from_regex(r"\A[a-z][a-z0-9-]{0,20}[a-z0-9]\Z")
operation_names = st.from_regex(r"\A[a-z][a-z0-9_]{0,15}\Z")
label_keys = st.from_regex(r"\A([a-z]{1,8}\.example/)?[a-z][a-z0-9-]{0,10}\Z").filter(
    lambda k: not k.startswith(("app.kubernetes.io/", "agents.enterprise.io/"))
)
label_values = st.from_regex(r"\A([A-Za-z0-9][-A-Za-z0-9_.]{0,20}[A-Za-z0-9])?\Z")
images = st.from_regex(r"\A[a-z0-9]{1,10}\.example/[a-z0-9-]{1,12}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,10})?\Z")
cpu = st.sampled_from(["100m", "250m", "500m", "1", "2", 1, 4])
memory = st.sampled_from(["128Mi", "512Mi", "1Gi", "2Gi", "1500M"])
cidrs = st.builds(
    lambda address, prefix: str(ipaddress.ip_network(f"{address}/{prefix}", strict=False)),
    st.ip_addresses(v=4),
    st.integers(8, 32),
)


@st.composite
def agent_documents(draw: st.DrawFn) -> dict[str, Any]:
    operations = draw(st.lists(operation_names, unique=True, max_size=6))
    spec: dict[str, Any] = {
        "image": draw(images),
        "replicas": draw(st.integers(0, 1000)),
        "operations": operations,
        "securityLevel": draw(st.sampled_from(["public", "internal", "confidential", "restricted"])),
        "compliance": {
            "frameworks": draw(st.lists(st.sampled_from(["GDPR", "HIPAA", "SOX"]), unique=True)),
            "retentionDays": draw(st.integers(1, 36500)),
        },
        "autoscaling": {
            "enabled": draw(st.booleans()),
            "minReplicas": draw(st.integers(1, 50)),
            "maxReplicas": draw(st.integers(1, 1000)),
            "targetCPUUtilization": draw(st.integers(1, 500)),
        },
        "resources": {"requests": {"cpu": draw(cpu), "memory": draw(memory)}, "limits": {"memory": "2Gi"}},
        "env": [
            {"name": n.upper(), "value": v}
            for n, v in draw(st.dictionaries(operation_names, st.text(max_size=30), max_size=4)).items()
        ],
        "rollout": {
            "promotion": draw(st.sampled_from(["Auto", "Manual"])),
            "scaleDownDelaySeconds": draw(st.integers(0, 86400)),
            "analysis": {"maxErrorRate": draw(st.floats(0, 1)), "maxP95LatencySeconds": draw(st.floats(0.01, 3600))},
        },
        "networkPolicy": {
            "enabled": draw(st.booleans()),
            "allowedIngressNamespaces": draw(st.lists(names, unique=True, max_size=3)),
            "allowedEgressCIDRs": draw(st.lists(cidrs, unique=True, max_size=3)),
        },
        "pod": {
            "labels": draw(st.dictionaries(label_keys, label_values, max_size=4)),
            "nodeSelector": draw(st.dictionaries(label_keys, label_values, max_size=2)),
        },
        "observability": {"traceSampleRatio": draw(st.floats(0, 1))},
    }
    if draw(st.booleans()):
        spec["rollout"]["previewReplicas"] = draw(st.integers(1, 1000))
    if draw(st.booleans()):
        postgres: dict[str, Any] = {"secretRef": {"name": draw(names)}}
        if draw(st.booleans()):  # with no peer at all, both layers must refuse it
            postgres["egress"] = {
                "cidrs": draw(st.lists(cidrs, unique=True, max_size=2)),
                **(
                    {"podSelector": draw(st.dictionaries(label_keys, label_values, max_size=2))}
                    if draw(st.booleans())
                    else {}
                ),
                "port": draw(st.integers(1, 65535)),
            }
        spec["state"] = {"postgres": postgres}
    with_smoke: bool = draw(st.booleans())
    if operations and with_smoke:
        spec["rollout"]["analysis"]["smoke"] = {"operation": draw(st.sampled_from(operations))}
    return {
        "apiVersion": "agents.enterprise.io/v1alpha1",
        "kind": "EnterpriseAgent",
        "metadata": {"name": draw(names), "namespace": draw(names)},
        "spec": spec,
    }


# What only the operator can judge (the CRD has no rule for it): such a spec reaches Stalled.
OPERATOR_ONLY = ("is not a valid CIDR", "must be at least requests")


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(agent_documents())
def test_accepted_specs_render_valid_objects_and_pass_the_crd(document: dict[str, Any]) -> None:
    try:
        agent = EnterpriseAgent.model_validate(document)
    except ValidationError as refused:
        # The models refused it; then the CRD must refuse it too, unless only the operator can
        # judge it (a CIDR's host bits, limits below requests), which the models alone check.
        event("refused by the models")
        if not api_errors(document):
            reasons = [error["msg"] for error in refused.errors()]
            assert all(any(only in reason for only in OPERATOR_ONLY) for reason in reasons), reasons
        return
    event("accepted")
    first = build_children(agent, RenderPlan.initial(agent))
    assert first == build_children(agent, RenderPlan.initial(agent))
    for child in first:
        validate_strict(child)
    assert rendered_zeros(first) == []  # nothing the server drops, which would look like drift forever
    assert api_errors(document) == []


def _leaves(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Paths of every field and item under ``value``."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in [(*path, k), *_leaves(v, (*path, k))]]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in [(*path, i), *_leaves(v, (*path, i))]]
    return []


def _location(path: tuple[str | int, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")


# Values of each JSON type, as a hostile or careless manifest has them where another type belongs.
# Not null and not integral floats: the API server prunes a null field and takes 3.0 for 3, which
# tests/kube_schema.py does not emulate (tests/cluster/test_operator.py checks both on a real one).
hostile_values = st.one_of(
    st.sampled_from(["3", "0.5", "yes", "true", "", "1Gi"]),
    st.sampled_from([True, False]),
    st.integers(-5, 70000),
    st.sampled_from([0.5, 2.5, -1.25, 1000.5]),
    st.just({"unknown": 1}),
    st.just(["x"]),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(agent_documents(), st.data())
def test_what_the_crd_refuses_the_operator_refuses_and_names_the_field(
    document: dict[str, Any], data: st.DataObject
) -> None:
    """One field of a spec replaced by a value of any type: when the CRD (schema and CEL rules)
    refuses the result, the operator's own validation (offline render, the reconciler) refuses it
    too, and names that field or one above it."""
    try:
        parse_agent(copy.deepcopy(document))
    except ManifestError:
        event("already refused before the change")  # the other property covers these
        return
    path = data.draw(st.sampled_from(_leaves(document["spec"], ("spec",))))
    value = data.draw(hostile_values)
    parent: Any = document
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value
    if not api_errors(copy.deepcopy(document)):
        event("accepted by the CRD")
        return
    event("refused by the CRD")
    try:
        parse_agent(document)
    except ManifestError as refused:
        where = _location(path)
        named = [e.path for e in refused.errors]
        assert any(where.startswith(p) or p.startswith(where) for p in named if p), (where, named)
        return
    raise AssertionError(f"the CRD refuses {_location(path)} = {value!r}, the operator accepts it")

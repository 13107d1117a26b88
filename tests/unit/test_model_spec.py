"""spec.model and spec.limits: what the operator and the API server refuse, and how the rest is
rendered into the runtime config, the pod and the NetworkPolicy."""

from __future__ import annotations

import copy
from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml

from agent_contract.config import LimitsConfig, ModelConfig, RateLimit, RuntimeConfig
from agent_contract.layout import MODEL_API_KEY_ENV, MODEL_CA_DIR, MODEL_CA_FILE
from agent_operator.manifest import ManifestError, parse_agent
from agent_operator.render import RenderPlan, build_children
from agent_runtime.operations.chat import host_allowed
from tests.helpers import example_document
from tests.kube_schema import api_errors, apply_defaults, cel_errors, crd_schema

MODEL = {"baseUrl": "https://llm.example/v1", "model": "gpt-4o-mini"}


def document(**spec: Any) -> dict[str, Any]:
    """A small agent with these spec fields."""
    return {
        "apiVersion": "agents.enterprise.io/v1alpha1",
        "kind": "EnterpriseAgent",
        "metadata": {"name": "bot", "namespace": "agents"},
        "spec": {"image": "registry.example/bot:1.0", **spec},
    }


def children(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rendered children by kind (one of each kind is enough here)."""
    agent = parse_agent(copy.deepcopy(doc))
    return {
        child["kind"]: child for child in build_children(agent, RenderPlan.initial(agent, operator_namespace="ops"))
    }


def runtime_config(doc: dict[str, Any]) -> RuntimeConfig:
    """The runtime config as the pod reads it: from the rendered ConfigMap."""
    return RuntimeConfig.from_yaml(children(doc)["ConfigMap"]["data"]["config.yaml"])


def container(doc: dict[str, Any]) -> dict[str, Any]:
    pod = children(doc)["Deployment"]["spec"]["template"]["spec"]
    (agent_container,) = pod["containers"]
    return dict(agent_container)


def model_rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The NetworkPolicy's egress rules other than DNS."""
    egress = children(doc)["NetworkPolicy"]["spec"]["egress"]
    return [rule for rule in egress if "to" in rule]


def refusal(doc: dict[str, Any]) -> str:
    with pytest.raises(ManifestError) as caught:
        parse_agent(copy.deepcopy(doc))
    return str(caught.value)


# --- the runtime config -----------------------------------------------------------------------------


def test_the_full_example_s_model_and_limits_reach_the_runtime_config() -> None:
    config = runtime_config(example_document("full"))
    assert config.model == ModelConfig(
        base_url="https://llm.internal.example/v1",
        model="meta-llama/Llama-3.1-70B-Instruct",
        api_key_env=MODEL_API_KEY_ENV,
        ca_bundle_file=MODEL_CA_FILE,
        connect_timeout_seconds=5,
        timeout_seconds=120,
        max_output_tokens=2048,
    )
    assert config.limits == LimitsConfig(
        per_caller=RateLimit(requests_per_minute=60, tokens_per_hour=200000),
        per_agent=RateLimit(requests_per_minute=1200, tokens_per_day=20000000),
    )


def test_defaults_are_the_contract_s_and_no_limits_means_unlimited() -> None:
    config = runtime_config(document(operations=["chat"], model=MODEL))
    assert config.model is not None
    assert (config.model.connect_timeout_seconds, config.model.timeout_seconds, config.model.max_output_tokens) == (
        10,
        60,
        4096,
    )
    assert config.limits == LimitsConfig()
    assert runtime_config(document()).model is None


def test_a_keyless_endpoint_has_no_key_env_and_no_key_variable() -> None:
    doc = document(operations=["chat"], model={"baseUrl": "http://ollama.models:11434/v1", "model": "llama3"})
    config = runtime_config(doc)
    assert config.model is not None
    assert config.model.api_key_env is None
    assert MODEL_API_KEY_ENV not in {var["name"] for var in container(doc)["env"]}


# --- the key: an env var from its Secret, and nowhere else --------------------------------------------


def test_the_key_reaches_the_pod_only_as_a_secret_reference() -> None:
    doc = example_document("full")
    env = [var for var in container(doc)["env"] if var["name"] == MODEL_API_KEY_ENV]
    assert env == [
        {"name": MODEL_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": "model-credentials", "key": "api-key"}}}
    ]
    config_yaml = children(doc)["ConfigMap"]["data"]["config.yaml"]
    assert yaml.safe_load(config_yaml)["model"]["apiKeyEnv"] == MODEL_API_KEY_ENV  # a name, not a value
    assert "model-credentials" not in config_yaml  # not even where the key is kept


@pytest.mark.parametrize("with_key_ref", [True, False], ids=["with apiKeySecretRef", "keyless"])
def test_a_user_env_var_cannot_take_the_key_s_name(with_key_ref: bool) -> None:
    """Two env vars of one name: the last wins, so a user's would replace (or, keyless, add) the key."""
    model = {**MODEL, "apiKeySecretRef": {"name": "creds", "key": "k"}} if with_key_ref else MODEL
    doc = document(
        operations=["chat"],
        model=model,
        env=[{"name": "LOG_LEVEL", "value": "x"}, {"name": MODEL_API_KEY_ENV, "value": "sk-1"}],
    )
    message = refusal(doc)
    assert "spec.env[1].name" in message
    assert "spec.model.apiKeySecretRef" in message
    assert "sk-1" not in message
    assert any(error.startswith("spec.env:") and MODEL_API_KEY_ENV in error for error in api_errors(doc))
    # Without spec.model, MODEL_API_KEY is an ordinary variable of the user's image.
    plain = document(env=[{"name": MODEL_API_KEY_ENV, "value": "x"}])
    parse_agent(copy.deepcopy(plain))
    assert api_errors(plain) == []


# --- the CA bundle --------------------------------------------------------------------------------------


def test_the_ca_bundle_is_mounted_where_the_runtime_config_points() -> None:
    doc = document(
        operations=["chat"], model={**MODEL, "caBundle": {"configMapRef": {"name": "corp-ca"}, "key": "root.pem"}}
    )
    pod = children(doc)["Deployment"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "corp-ca"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": MODEL_CA_DIR, "readOnly": True}
    (item,) = volume["configMap"]["items"]  # only the bundle's key, under the contract's file name
    assert item["key"] == "root.pem"
    config = runtime_config(doc)
    assert config.model is not None
    assert config.model.ca_bundle_file == MODEL_CA_FILE
    assert str(PurePosixPath(mount["mountPath"]) / item["path"]) == config.model.ca_bundle_file


def test_without_a_ca_bundle_nothing_is_mounted_and_the_system_cas_are_used() -> None:
    doc = document(operations=["chat"], model=MODEL)
    mounts = {m["mountPath"] for m in container(doc)["volumeMounts"]}
    assert MODEL_CA_DIR not in mounts
    config = runtime_config(doc)
    assert config.model is not None
    assert config.model.ca_bundle_file is None


def test_the_ca_key_defaults_to_ca_crt() -> None:
    doc = document(operations=["chat"], model={**MODEL, "caBundle": {"configMapRef": {"name": "corp-ca"}}})
    pod = children(doc)["Deployment"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "corp-ca"]
    assert volume["configMap"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


# --- egress: the runtime's allow-list and the NetworkPolicy -----------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "host"),
    [
        ("https://LLM.Example.com/v1", "llm.example.com"),
        ("http://10.50.0.7:8000/v1", "10.50.0.7"),
        ("https://[fd00::7]:8443/v1", "fd00::7"),
        ("http://ollama.models:11434/v1", "ollama.models"),
    ],
)
def test_the_endpoint_s_host_joins_the_runtime_s_allow_list(base_url: str, host: str) -> None:
    config = runtime_config(
        document(
            operations=["chat"],
            model={**MODEL, "baseUrl": base_url},
            networkPolicy={"allowedEgressHosts": ["tools.example"]},
        )
    )
    assert config.egress.allowed_hosts == ["tools.example", host]
    assert config.model is not None
    assert host_allowed(config.model.base_url, config.egress.allowed_hosts)  # as the runtime checks it


def test_a_host_the_user_already_lists_is_listed_once() -> None:
    config = runtime_config(
        document(operations=["chat"], model=MODEL, networkPolicy={"allowedEgressHosts": ["llm.example"]})
    )
    assert config.egress.allowed_hosts == ["llm.example"]


@pytest.mark.parametrize(
    ("base_url", "egress_cidrs", "rule"),
    [
        ("https://10.50.0.7/v1", [], {"cidrs": ["10.50.0.7/32"], "port": 443}),
        ("http://10.50.0.7/v1", [], {"cidrs": ["10.50.0.7/32"], "port": 80}),
        ("https://10.50.0.7:8443/v1", [], {"cidrs": ["10.50.0.7/32"], "port": 8443}),
        ("https://[fd00::7]/v1", [], {"cidrs": ["fd00::7/128"], "port": 443}),
        (
            "https://llm.example/v1",
            ["10.40.8.0/24", "10.40.9.0/24"],
            {"cidrs": ["10.40.8.0/24", "10.40.9.0/24"], "port": 443},
        ),
        (
            "http://10.50.0.7:8000/v1",
            ["10.50.0.7/32", "10.60.0.0/16"],
            {"cidrs": ["10.50.0.7/32", "10.60.0.0/16"], "port": 8000},
        ),
    ],
)
def test_the_network_policy_admits_the_endpoint_s_addresses_on_its_port(
    base_url: str, egress_cidrs: list[str], rule: dict[str, Any]
) -> None:
    doc = document(operations=["chat"], model={**MODEL, "baseUrl": base_url, "egressCIDRs": egress_cidrs})
    assert model_rules(doc) == [
        {
            "to": [{"ipBlock": {"cidr": cidr}} for cidr in rule["cidrs"]],
            "ports": [{"protocol": "TCP", "port": rule["port"]}],
        }
    ]


def test_a_host_name_without_egress_cidrs_adds_no_rule() -> None:
    """A NetworkPolicy cannot name hosts: the user lists the addresses (or allowedEgressCIDRs does)."""
    assert model_rules(document(operations=["chat"], model=MODEL)) == []


# --- validation: the operator and the API server refuse the same, naming the field ----------------------

BAD_URLS = {
    "credentials": "https://svc:hunter2@llm.example/v1",
    "user only": "https://hunter2@llm.example/v1",
    "query": "https://llm.example/v1?api-key=hunter2",
    "empty query": "https://llm.example/v1?",
    "fragment": "https://llm.example/v1#hunter2",
    "scheme": "ftp://llm.example/v1",
    "no scheme": "llm.example/v1",
    "no host": "https:///v1",
    "port 0": "https://llm.example:0/v1",
    "port too big": "https://llm.example:65536/v1",
    "port not a number": "https://llm.example:https/v1",
    "bracketed non-address": "https://[llm.example]/v1",
    "space": "https://llm.example/v 1",
    "underscore host": "https://llm_1.example/v1",
    "leading zero in an address": "http://010.0.0.1/v1",
    "address part above 255": "https://10.0.0.256/v1",
    "three-part address": "https://10.0.1:8000/v1",
    "empty": "",
}
GOOD_URLS = [
    "https://api.openai.com/v1",
    "http://10.0.0.1:8000/v1",
    "https://[fd00::1]:8443/v1",
    "http://ollama.models:11434/v1",
    "https://my-resource.openai.azure.com/openai/v1/",
    "https://gateway.example",
    "https://llm.example:65535/v1",
    "http://0.0.0.0:1/v1",
    "https://255.255.255.255/v1",
    "https://10.0.0.1.example/v1",
]


@pytest.mark.parametrize("url", BAD_URLS.values(), ids=list(BAD_URLS))
def test_a_bad_base_url_is_refused_by_both_naming_the_field(url: str) -> None:
    doc = document(operations=["chat"], model={**MODEL, "baseUrl": url})
    message = refusal(doc)
    assert "spec.model.baseUrl" in message
    assert "hunter2" not in message  # the refusal (an Event, the status) never repeats a secret
    errors = api_errors(doc)
    assert any(error.startswith("spec.model.baseUrl") for error in errors), errors


@pytest.mark.parametrize("url", GOOD_URLS)
def test_a_good_base_url_is_accepted_by_both(url: str) -> None:
    doc = document(operations=["chat"], model={**MODEL, "baseUrl": url})
    parse_agent(copy.deepcopy(doc))
    assert api_errors(doc) == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://svc:hunter2@llm.example/v1", "must not carry credentials"),
        ("https://llm.example/v1?api-key=hunter2", "must not have a query or fragment"),
        ("https://llm.example/v1#x", "must not have a query or fragment"),
        ("http://010.0.0.1/v1", "has a numeric host that is not an IPv4 address"),
    ],
)
def test_the_api_server_says_why_a_secret_bearing_url_is_refused(url: str, reason: str) -> None:
    """Besides the pattern's bare "should match", a CEL rule gives the reason (the API server
    reports both: a pattern mismatch does not stop CEL rules from running)."""
    doc = apply_defaults(document(operations=["chat"], model={**MODEL, "baseUrl": url}), crd_schema())
    assert any(error.startswith("spec.model.baseUrl") and reason in error for error in cel_errors(doc, crd_schema()))


SPEC_REFUSALS = {
    "chat without a model": ({"operations": ["chat"]}, "spec.model"),
    "no model name": ({"operations": ["chat"], "model": {"baseUrl": "https://llm.example/v1"}}, "spec.model.model"),
    "blank in the model name": ({"model": {**MODEL, "model": "gpt 4"}}, "spec.model.model"),
    "unknown provider": ({"model": {**MODEL, "provider": "anthropic"}}, "spec.model.provider"),
    "timeout 0": ({"model": {**MODEL, "timeoutSeconds": 0}}, "spec.model.timeoutSeconds"),
    "timeout above an hour": ({"model": {**MODEL, "timeoutSeconds": 3601}}, "spec.model.timeoutSeconds"),
    "connect timeout 0": ({"model": {**MODEL, "connectTimeoutSeconds": 0}}, "spec.model.connectTimeoutSeconds"),
    "connect timeout above the call's": (
        {"model": {**MODEL, "connectTimeoutSeconds": 30, "timeoutSeconds": 20}},
        "spec.model.connectTimeoutSeconds",
    ),
    "max output tokens 0": ({"model": {**MODEL, "maxOutputTokens": 0}}, "spec.model.maxOutputTokens"),
    "key ref without key": (
        {"model": {**MODEL, "apiKeySecretRef": {"name": "creds"}}},
        "spec.model.apiKeySecretRef.key",
    ),
    "key ref with a bad name": (
        {"model": {**MODEL, "apiKeySecretRef": {"name": "Creds!", "key": "k"}}},
        "spec.model.apiKeySecretRef.name",
    ),
    "CA bundle without ConfigMap": (
        {"model": {**MODEL, "caBundle": {"key": "ca.crt"}}},
        "spec.model.caBundle.configMapRef",
    ),
    "egress CIDR not a CIDR": ({"model": {**MODEL, "egressCIDRs": ["10.0.0.0"]}}, "spec.model.egressCIDRs"),
    "unknown model field": ({"model": {**MODEL, "apiKey": "sk-1"}}, "spec.model.apiKey"),
    "rate limit 0": ({"limits": {"perAgent": {"requestsPerMinute": 0}}}, "spec.limits.perAgent.requestsPerMinute"),
    "token budget negative": ({"limits": {"perCaller": {"tokensPerDay": -5}}}, "spec.limits.perCaller.tokensPerDay"),
    "unknown limit": ({"limits": {"perCaller": {"tokensPerMonth": 5}}}, "spec.limits.perCaller.tokensPerMonth"),
    "unknown limit scope": ({"limits": {"perTeam": {}}}, "spec.limits.perTeam"),
}


@pytest.mark.parametrize(("spec", "field"), SPEC_REFUSALS.values(), ids=list(SPEC_REFUSALS))
def test_refused_by_the_operator_and_the_api_server(spec: dict[str, Any], field: str) -> None:
    doc = document(**spec)
    assert field in refusal(doc)
    errors = api_errors(doc)
    assert any(field in error for error in errors), errors


def test_host_bits_in_an_egress_cidr_are_refused_by_the_operator() -> None:
    """The CRD's pattern sees a CIDR's shape only; the operator refuses host bits (Stalled)."""
    assert "spec.model.egressCIDRs" in refusal(document(model={**MODEL, "egressCIDRs": ["10.40.8.1/24"]}))


def test_a_model_without_chat_is_accepted() -> None:
    """spec.model can be set before chat is enabled (or by an image that calls it itself)."""
    doc = document(operations=["analyze_data"], model=MODEL)
    parse_agent(copy.deepcopy(doc))
    assert api_errors(doc) == []


def test_every_limit_is_optional_and_reaches_the_runtime() -> None:
    config = runtime_config(document(limits={"perCaller": {"tokensPerDay": 5000}}))
    assert config.limits == LimitsConfig(per_caller=RateLimit(tokens_per_day=5000))

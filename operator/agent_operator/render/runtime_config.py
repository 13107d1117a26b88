"""The runtime ConfigMap: an instance of the runtime's own config model, serialised."""

from __future__ import annotations

from agent_contract.config import (
    DEFAULT_ROLES,
    AuthConfig,
    AuthMode,
    ComplianceConfig,
    EgressConfig,
    LimitsConfig,
    ModelConfig,
    ObservabilityConfig,
    RateLimit,
    RuntimeConfig,
)
from agent_contract.layout import CONFIG_FILE_KEY, MODEL_API_KEY_ENV, MODEL_CA_FILE, USERS_DIR, USERS_FILE_KEY
from agent_operator.render.common import LABEL_REVISION, Manifest, config_map_name, metadata
from agent_operator.spec import EnterpriseAgent, ModelSpec, RateLimitSpec


def build_model_config(model: ModelSpec) -> ModelConfig:
    """spec.model as the runtime reads it. The key is named by its env var only: the value stays in
    its Secret and reaches the pod as that variable (see the workload renderer)."""
    return ModelConfig(
        provider=model.provider,
        base_url=model.base_url,
        model=model.model,
        api_key_env=MODEL_API_KEY_ENV if model.api_key_secret_ref is not None else None,
        ca_bundle_file=MODEL_CA_FILE if model.ca_bundle is not None else None,
        connect_timeout_seconds=model.connect_timeout_seconds,
        timeout_seconds=model.timeout_seconds,
        max_output_tokens=model.max_output_tokens,
    )


def _rate_limit(limit: RateLimitSpec) -> RateLimit:
    return RateLimit(
        requests_per_minute=limit.requests_per_minute,
        tokens_per_hour=limit.tokens_per_hour,
        tokens_per_day=limit.tokens_per_day,
    )


def allowed_hosts(agent: EnterpriseAgent) -> list[str]:
    """The runtime's egress allow-list: the hosts the user lists, then the model endpoint's host
    (the runtime refuses chat when its host is not on the list), each once."""
    hosts = list(agent.spec.network_policy.allowed_egress_hosts)
    if agent.spec.model is not None:
        hosts.append(agent.spec.model.host)
    return list(dict.fromkeys(hosts))


def build_runtime_config(agent: EnterpriseAgent) -> RuntimeConfig:
    spec = agent.spec
    security = spec.security
    return RuntimeConfig(
        agent_name=agent.name,
        namespace=agent.namespace,
        security_level=spec.security_level,
        operations=list(spec.operations),
        roles=dict(security.roles) if security.roles is not None else dict(DEFAULT_ROLES),
        auth=AuthConfig(
            mode=AuthMode(security.auth_mode.value),
            algorithm=security.signing_algorithm,
            issuer=security.issuer or f"{agent.name}.{agent.namespace}",
            audience=security.audience or agent.name,
            jwks_uri=security.jwks_uri,
            token_ttl_seconds=security.token_ttl_seconds,
            users_file=f"{USERS_DIR}/{USERS_FILE_KEY}" if security.users_secret_ref else None,
        ),
        compliance=ComplianceConfig(
            frameworks=list(spec.compliance.frameworks),
            retention_days=spec.compliance.retention_days,
            financial_operations=list(spec.compliance.financial_operations),
        ),
        observability=ObservabilityConfig(
            service_name=agent.name,
            otlp_endpoint=spec.observability.otlp_endpoint,
            trace_sample_ratio=spec.observability.trace_sample_ratio,
        ),
        egress=EgressConfig(allowed_hosts=allowed_hosts(agent)),
        model=build_model_config(spec.model) if spec.model is not None else None,
        limits=LimitsConfig(
            per_caller=_rate_limit(spec.limits.per_caller), per_agent=_rate_limit(spec.limits.per_agent)
        ),
    )


def build_config_map(agent: EnterpriseAgent, config_yaml: str, revision: str) -> Manifest:
    """One immutable ConfigMap per revision, so the old colour keeps its config during a rollout.
    ``config_yaml`` is the runtime config as the revision was first rendered (its record)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(agent, config_map_name(agent, revision), {LABEL_REVISION: revision}),
        "immutable": True,
        "data": {CONFIG_FILE_KEY: config_yaml},
    }

"""The runtime ConfigMap: an instance of the runtime's own config model, serialised."""

from __future__ import annotations

from agent_contract.config import (
    DEFAULT_ROLES,
    AuthConfig,
    AuthMode,
    ComplianceConfig,
    EgressConfig,
    ObservabilityConfig,
    RuntimeConfig,
)
from agent_contract.layout import CONFIG_FILE_KEY, USERS_DIR, USERS_FILE_KEY
from agent_operator.render.common import LABEL_REVISION, Manifest, config_map_name, metadata
from agent_operator.spec import EnterpriseAgent


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
        egress=EgressConfig(allowed_hosts=list(spec.network_policy.allowed_egress_hosts)),
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

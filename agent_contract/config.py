"""The runtime's configuration model: the one schema shared by the runtime and the operator.

The runtime loads it from ``/etc/agent/config.yaml``; the operator's ConfigMap renderer builds an
instance of the same model and serialises it. There is never a second schema.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, model_validator
from pydantic.alias_generators import to_camel

from agent_contract.layout import DATA_DIR, KEYS_DIR, MODEL_API_KEY_ENV

# libyaml's emitter when PyYAML was built with it (same output, several times faster).
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class SecurityLevel(StrEnum):
    """Data classification, ordered from least to most sensitive."""

    PUBLIC = "public"
    INTERNAL = "internal"
    CONFIDENTIAL = "confidential"
    RESTRICTED = "restricted"

    @property
    def rank(self) -> int:
        return _LEVEL_ORDER.index(self)

    def allows(self, required: SecurityLevel) -> bool:
        """True when data classified ``required`` may be handled at this level."""
        return required.rank <= self.rank


_LEVEL_ORDER = list(SecurityLevel)


class Permission(StrEnum):
    READ = "read"
    WRITE = "write"
    EXECUTE = "execute"
    ADMIN = "admin"


class ComplianceFramework(StrEnum):
    GDPR = "GDPR"
    HIPAA = "HIPAA"
    SOX = "SOX"


class AuthMode(StrEnum):
    LOCAL = "local"
    OIDC = "oidc"


class SigningAlgorithm(StrEnum):
    EDDSA = "EdDSA"
    RS256 = "RS256"
    HS256 = "HS256"


DEFAULT_ROLES: dict[str, list[Permission]] = {
    "admin": [Permission.READ, Permission.WRITE, Permission.EXECUTE, Permission.ADMIN],
    "operator": [Permission.READ, Permission.WRITE, Permission.EXECUTE],
    "analyst": [Permission.READ, Permission.EXECUTE],
    "viewer": [Permission.READ],
}

# The most sensitive data each role may see; an operation's level must not exceed it.
DEFAULT_CLEARANCES: dict[str, SecurityLevel] = {
    "admin": SecurityLevel.RESTRICTED,
    "operator": SecurityLevel.CONFIDENTIAL,
    "analyst": SecurityLevel.CONFIDENTIAL,
    "viewer": SecurityLevel.INTERNAL,
}

ROLE_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
OPERATION_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
OperationName = Annotated[str, Field(pattern=OPERATION_NAME_PATTERN, max_length=63)]


class ConfigModel(BaseModel):
    """Base: camelCase on the wire (like every Kubernetes object), unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class AuthConfig(ConfigModel):
    mode: AuthMode = AuthMode.LOCAL
    algorithm: SigningAlgorithm = SigningAlgorithm.EDDSA
    issuer: str = "enterprise-agent"
    audience: str = "enterprise-agent"
    jwks_uri: str | None = None
    token_ttl_seconds: int = Field(default=900, ge=60, le=86400)
    refresh_ttl_seconds: int = Field(default=28800, ge=300, le=2592000)
    keys_dir: str = KEYS_DIR
    users_file: str | None = None
    roles_claim: str = "roles"  # where OIDC tokens carry the caller's roles
    leeway_seconds: int = Field(default=30, ge=0, le=300)  # clock skew allowed on exp and nbf
    # A login's refresh chain ends this long after the password was checked, however often it refreshes.
    session_max_seconds: int = Field(default=43200, ge=300, le=2592000)
    # Peers whose X-Forwarded-For is believed (the ingress); nobody's by default.
    trusted_proxies: list[IPvAnyNetwork] = Field(default_factory=list, max_length=64)
    # OIDC: also take `typ: JWT` or no typ as an access token (issuers that do not follow RFC 9068).
    accept_jwt_type: bool = False


class AuditConfig(ConfigModel):
    file: str | None = None  # default: <dataDir>/audit.log
    stdout: bool = True  # also write each record to stdout, for the cluster's log collector
    checkpoint_every: int = Field(default=1000, ge=1)  # a signed checkpoint after this many records
    checkpoint_seconds: float = Field(default=60.0, gt=0)  # ... or this long after the last one


class ComplianceConfig(ConfigModel):
    frameworks: list[ComplianceFramework] = Field(default_factory=list)
    retention_days: int = Field(default=365, ge=1, le=36500)
    # With SOX, these need a second person's approval (maker-checker) before they run.
    financial_operations: list[OperationName] = Field(default_factory=list)


class ObservabilityConfig(ConfigModel):
    service_name: str = "agent"
    otlp_endpoint: str | None = None
    trace_sample_ratio: float = Field(default=0.1, ge=0.0, le=1.0)


class CircuitBreakerConfig(ConfigModel):
    failure_ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    minimum_throughput: int = Field(default=10, ge=1)
    window_seconds: float = Field(default=30.0, gt=0)
    open_seconds: float = Field(default=30.0, gt=0)


class RetryConfig(ConfigModel):
    max_attempts: int = Field(default=3, ge=1, le=10)
    base_delay_seconds: float = Field(default=0.1, gt=0)
    max_delay_seconds: float = Field(default=5.0, gt=0)


class ResilienceConfig(ConfigModel):
    operation_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    max_concurrent_per_operation: int = Field(default=16, ge=1, le=10000)
    max_queued_per_operation: int = Field(default=64, ge=0, le=100000)
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)


class ModelProvider(StrEnum):
    # Any endpoint that speaks OpenAI's chat completions API: OpenAI, Azure OpenAI's v1 API, vLLM,
    # Ollama, LiteLLM, most gateways. Others join only with their own adapter.
    OPENAI = "openai"


class ModelConfig(ConfigModel):
    """The model the ``chat`` operation calls (``spec.model`` in the EnterpriseAgent)."""

    provider: ModelProvider = ModelProvider.OPENAI
    # The API base URL as OpenAI's SDKs take it (e.g. https://api.openai.com/v1);
    # /chat/completions is appended.
    base_url: str = Field(pattern=r"^https?://[^\s]+$", max_length=2048)
    model: str = Field(min_length=1, max_length=256)
    # The key comes from the environment (an env var from a Secret), never the ConfigMap.
    # None: a keyless endpoint (no Authorization header).
    api_key_env: str | None = MODEL_API_KEY_ENV
    # PEM file of the CAs trusted for the endpoint instead of the system's (a private endpoint).
    ca_bundle_file: str | None = None
    connect_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    timeout_seconds: float = Field(default=60.0, gt=0, le=3600)  # the whole call, streaming included
    max_output_tokens: int = Field(default=4096, ge=1, le=1_000_000)  # callers' max_tokens is capped here


class RateLimit(ConfigModel):
    """Limits over sliding windows; None: unlimited."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_hour: int | None = Field(default=None, ge=1)
    tokens_per_day: int | None = Field(default=None, ge=1)


class LimitsConfig(ConfigModel):
    """Budgets and rate limits: per caller (the token's subject) and for the agent as a whole
    (every replica together when they share state)."""

    per_caller: RateLimit = Field(default_factory=RateLimit)
    per_agent: RateLimit = Field(default_factory=RateLimit)


class EgressConfig(ConfigModel):
    """Hosts the runtime may call (model and tool endpoints); enforced by the runtime's client."""

    allowed_hosts: list[str] = Field(default_factory=list)


class RuntimeConfig(ConfigModel):
    agent_name: str
    namespace: str = "default"
    security_level: SecurityLevel = SecurityLevel.INTERNAL
    operations: list[OperationName] = Field(default_factory=list)
    roles: dict[Annotated[str, Field(pattern=ROLE_NAME_PATTERN)], list[Permission]] = Field(
        default_factory=lambda: dict(DEFAULT_ROLES)
    )
    clearances: dict[Annotated[str, Field(pattern=ROLE_NAME_PATTERN)], SecurityLevel] = Field(
        default_factory=lambda: dict(DEFAULT_CLEARANCES)
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    compliance: ComplianceConfig = Field(default_factory=ComplianceConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    resilience: ResilienceConfig = Field(default_factory=ResilienceConfig)
    egress: EgressConfig = Field(default_factory=EgressConfig)
    model: ModelConfig | None = None
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    data_dir: str = DATA_DIR

    @model_validator(mode="after")
    def _operations_unique(self) -> RuntimeConfig:
        if len(set(self.operations)) != len(self.operations):
            raise ValueError("operations: names must be unique")
        return self

    def to_yaml(self) -> str:
        """The canonical YAML form, as written into the ConfigMap and by ``agent-runtime init``."""
        data: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        if self.model is not None and self.model.api_key_env is None:
            # A keyless endpoint, on purpose: left out, apiKeyEnv would read back as its default.
            data["model"]["apiKeyEnv"] = None
        return yaml.dump(data, Dumper=_YAML_DUMPER, sort_keys=True)

    @classmethod
    def from_yaml(cls, text: str) -> RuntimeConfig:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError("runtime config: the document must be a mapping")
        return cls.model_validate(data)

"""The EnterpriseAgent API: pydantic models of its spec and status.

This module is the single source of truth for the API. The CRD in ``crds/`` is generated from it
(``make crds``), so every bound, enum, default and description here is also what the API server
enforces and what ``kubectl explain`` prints. Cross-field rules are written twice on purpose: as a
pydantic validator (for the operator and offline ``render``) and as a CEL rule (for ``kubectl apply``);
tests check that both reject the same manifests.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from agent_contract.config import (
    OPERATION_NAME_PATTERN,
    ROLE_NAME_PATTERN,
    ComplianceFramework,
    ModelProvider,
    Permission,
    SecurityLevel,
    SigningAlgorithm,
)
from agent_contract.layout import DATABASE_URL_ENV, MODEL_API_KEY_ENV, MODEL_CA_DIR, MODEL_CA_FILE
from agent_contract.operations import BUILTIN_OPERATIONS

GROUP = "agents.enterprise.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "EnterpriseAgent"
PLURAL = "enterpriseagents"
SINGULAR = "enterpriseagent"
SHORT_NAMES = ["ea"]

# Agent names become Service names (DNS-1035) with suffixes such as "-preview" and label values
# (63 characters), so they are shorter than a plain object name.
AGENT_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
AGENT_NAME_MAX_LENGTH = 40
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A Kubernetes label or annotation key: an optional DNS subdomain prefix, then a name.
QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# Resource quantities as the API server parses them ("250m", "1Gi", "1.5", "2e3").
QUANTITY = r"^[+]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$"
# An OCI image reference: no whitespace, no shell metacharacters.
IMAGE_REFERENCE = r"^[a-z0-9][A-Za-z0-9._:/@-]*$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
HTTP_URL = r"^https?://[^\s]+$"
HOSTNAME = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
CIDR_SHAPE = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$"
REVISION_PATTERN = r"^[a-f0-9]{10}$"
# A model endpoint's base URL: http(s)://host[:port][/path], the host a DNS name or an IP literal
# ([...] for IPv6). No user:password@, query or fragment: the URL is written into the ConfigMap.
_PORT = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
MODEL_BASE_URL = (
    r"^https?://([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])"
    rf"(:{_PORT})?(/[^\s?#]*)?$"
)
# Label and annotation prefixes the operator owns; user-supplied ones may not use them.
RESERVED_PREFIXES = ("app.kubernetes.io/", f"{GROUP}/")

# The CRD's bound on status.message and status.rollout.message: a longer one would make the whole
# status write fail (422) and the agent show nothing. Conditions allow 32768 (as metav1.Condition),
# analysis check messages 1024. The status models cut every message to its bound themselves
# (:data:`StatusMessage` and its kin), so no path that builds a status can exceed it.
MAX_MESSAGE_LENGTH = 4096
MAX_CONDITION_MESSAGE_LENGTH = 32768
MAX_CHECK_MESSAGE_LENGTH = 1024
ELLIPSIS = "..."


def cut_message(text: str, limit: int = MAX_MESSAGE_LENGTH) -> str:
    """``text``, or its first ``limit`` characters ending in a visible ellipsis when it is longer.
    Characters, not bytes: the API server counts a string's maxLength in characters."""
    return text if len(text) <= limit else text[: limit - len(ELLIPSIS)] + ELLIPSIS


def _cut_to(limit: int) -> Any:
    """A validator and serializer that cut a message to ``limit`` (see :data:`StatusMessage`)."""

    def cut(value: Any) -> Any:
        return cut_message(value, limit) if isinstance(value, str) else value

    return cut


# Keys of a CEL rule in the generated CRD.
CEL = "x-kubernetes-validations"


def cel(rule: str, message: str, field_path: str | None = None, reason: str = "FieldValueInvalid") -> dict[str, str]:
    """One CRD validation rule; ``field_path`` points ``kubectl`` at the offending field."""
    entry = {"rule": rule, "message": message, "reason": reason}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def crd_extra(**schema: Any) -> dict[str, Any]:
    """Extra OpenAPI keywords for the generated CRD schema of a field or model."""
    return schema


class ApiModel(BaseModel):
    """Base of the API models: camelCase on the wire, unknown fields rejected, immutable."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


_QUANTITY_SUFFIXES: dict[str, int | Decimal] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip


def parse_quantity(value: int | str) -> Decimal:
    """The numeric value of a Kubernetes quantity ("250m" -> 0.25, "1Gi" -> 1073741824)."""
    text = str(value)
    if re.fullmatch(QUANTITY, text) is None:
        raise ValueError(f"{text!r} is not a quantity")
    number = re.match(r"^[+]?[0-9.]+", text)
    assert number is not None  # guaranteed by the QUANTITY pattern
    suffix = text[number.end() :]
    if re.fullmatch(r"[eE][+-]?[0-9]+", suffix):  # an exponent, not the exa suffixes "E" and "Ei"
        return Decimal(text)
    return Decimal(number.group()) * Decimal(_QUANTITY_SUFFIXES[suffix])


def _check_quantity(value: int | str) -> int | str:
    parse_quantity(value)
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    Field(
        description="A resource quantity, such as 250m, 1.5 or 512Mi.",
        json_schema_extra=crd_extra(**{"x-kubernetes-int-or-string": True, "pattern": QUANTITY}),
    ),
]
LabelMap = Annotated[
    dict[
        Annotated[str, Field(max_length=317, pattern=QUALIFIED_NAME)],
        Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)],
    ],
    Field(max_length=64),
]
AnnotationMap = Annotated[
    dict[Annotated[str, Field(max_length=317, pattern=QUALIFIED_NAME)], Annotated[str, Field(max_length=4096)]],
    Field(max_length=64),
]
Cidr = Annotated[str, Field(max_length=49, pattern=CIDR_SHAPE)]


def check_cidrs(value: list[str]) -> list[str]:
    """Refuses CIDRs with host bits set (10.1.2.3/8), which the CRD's pattern cannot see."""
    for index, cidr in enumerate(value):
        try:
            ipaddress.ip_network(cidr, strict=True)
        except ValueError as error:
            raise ValueError(f"[{index}]: {cidr!r} is not a valid CIDR: {error}") from None
    return value


# --- workload -------------------------------------------------------------------------------------


class LocalObjectReference(ApiModel):
    """A reference to an object in the agent's namespace."""

    name: str = Field(
        description="Name of the referenced object.", min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN
    )


class KeySelector(ApiModel):
    """Selects one key of a Secret or ConfigMap."""

    name: str = Field(
        description="Name of the Secret or ConfigMap.", min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN
    )
    key: str = Field(description="The key to select.", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    optional: bool | None = Field(
        default=None, description="Whether the Secret or ConfigMap or its key may be missing."
    )


class FieldSelector(ApiModel):
    """Selects a field of the pod, as the downward API does."""

    field_path: str = Field(description="Path of the field, such as metadata.name.", min_length=1, max_length=256)
    api_version: str | None = Field(
        default=None, description="Version of the schema the path is written in.", max_length=64
    )


class ResourceFieldSelector(ApiModel):
    """Selects a resource of the agent container, as the downward API does."""

    resource: str = Field(description="The resource, such as limits.memory.", min_length=1, max_length=128)
    divisor: Quantity | None = Field(default=None, description="Unit the value is expressed in.")


class EnvVarSource(ApiModel):
    """Where an environment variable's value comes from. Exactly one source must be set."""

    model_config = ConfigDict(
        json_schema_extra=crd_extra(
            **{
                CEL: [
                    cel(
                        "[has(self.secretKeyRef), has(self.configMapKeyRef), has(self.fieldRef),"
                        " has(self.resourceFieldRef)].filter(x, x).size() == 1",
                        "valueFrom must set exactly one of secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef",
                    )
                ]
            }
        )
    )

    secret_key_ref: KeySelector | None = Field(default=None, description="A key of a Secret.")
    config_map_key_ref: KeySelector | None = Field(default=None, description="A key of a ConfigMap.")
    field_ref: FieldSelector | None = Field(default=None, description="A field of the pod.")
    resource_field_ref: ResourceFieldSelector | None = Field(default=None, description="A resource of the container.")

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvVarSource:
        chosen = [self.secret_key_ref, self.config_map_key_ref, self.field_ref, self.resource_field_ref]
        if sum(source is not None for source in chosen) != 1:
            raise ValueError(
                "valueFrom must set exactly one of secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef"
            )
        return self


class EnvVar(ApiModel):
    """An environment variable of the agent container."""

    model_config = ConfigDict(
        json_schema_extra=crd_extra(
            **{CEL: [cel("!(has(self.value) && has(self.valueFrom))", "set value or valueFrom, not both")]}
        )
    )

    name: str = Field(
        description="Variable name. Names starting with AGENT_ are reserved for the operator.",
        min_length=1,
        max_length=253,
        pattern=ENV_NAME,
    )
    value: str | None = Field(default=None, description="A literal value.", max_length=32768)
    value_from: EnvVarSource | None = Field(
        default=None, description="A value taken from a Secret, ConfigMap or the pod."
    )

    @model_validator(mode="after")
    def _one_value(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("set value or valueFrom, not both")
        return self


class EnvFromSource(ApiModel):
    """Imports every key of a ConfigMap or Secret as environment variables."""

    model_config = ConfigDict(
        json_schema_extra=crd_extra(
            **{
                CEL: [
                    cel(
                        "has(self.configMapRef) != has(self.secretRef)",
                        "envFrom must set exactly one of configMapRef, secretRef",
                    )
                ]
            }
        )
    )

    prefix: str | None = Field(
        default=None, description="Prefix added to every imported name.", max_length=253, pattern=ENV_NAME
    )
    config_map_ref: LocalObjectReference | None = Field(default=None, description="The ConfigMap to import.")
    secret_ref: LocalObjectReference | None = Field(default=None, description="The Secret to import.")

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvFromSource:
        if (self.config_map_ref is None) == (self.secret_ref is None):
            raise ValueError("envFrom must set exactly one of configMapRef, secretRef")
        return self


class ResourceRequirements(ApiModel):
    """Compute resources of the agent container."""

    requests: dict[Annotated[str, Field(max_length=253, pattern=QUALIFIED_NAME)], Quantity] = Field(
        default_factory=lambda: dict[str, int | str](cpu="250m", memory="512Mi"),
        description="Minimum resources the scheduler reserves. Defaults to 250m CPU and 512Mi memory.",
        max_length=16,
    )
    limits: dict[Annotated[str, Field(max_length=253, pattern=QUALIFIED_NAME)], Quantity] = Field(
        default_factory=lambda: dict[str, int | str](memory="1Gi"),
        description="Maximum resources the container may use. Defaults to 1Gi memory and no CPU limit (CPU limits throttle latency-bound agents).",
        max_length=16,
    )

    @model_validator(mode="after")
    def _limits_cover_requests(self) -> ResourceRequirements:
        for resource in sorted(self.requests.keys() & self.limits.keys()):
            request, limit = self.requests[resource], self.limits[resource]
            if parse_quantity(limit) < parse_quantity(request):
                raise ValueError(f"limits.{resource} ({limit}) must be at least requests.{resource} ({request})")
        return self


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(ApiModel):
    """Lets agent pods run on nodes with a matching taint."""

    key: str | None = Field(
        default=None, description="Taint key to match; empty with Exists matches all taints.", max_length=317
    )
    operator: TolerationOperator | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, description="Taint value to match with Equal.", max_length=63)
    effect: TaintEffect | None = Field(default=None, description="Taint effect to match; empty matches all effects.")
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated.", ge=0, le=31536000
    )


_RESERVED_KEYS_RULE = cel(
    "self.all(k, " + " && ".join(f"!k.startsWith('{prefix}')" for prefix in RESERVED_PREFIXES) + ")",
    "keys under " + " and ".join(RESERVED_PREFIXES) + " are reserved for the operator",
)


class PodOverrides(ApiModel):
    """Scheduling and metadata of the agent pods."""

    node_selector: dict[
        Annotated[str, Field(max_length=317, pattern=QUALIFIED_NAME)],
        Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)],
    ] = Field(default_factory=dict, description="Node labels a node must have to run agent pods.", max_length=32)
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints agent pods tolerate.", max_length=32
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="Pod affinity and anti-affinity, as in a PodSpec; validated by the API server when the Deployment is written.",
        json_schema_extra=crd_extra(**{"x-kubernetes-preserve-unknown-fields": True}),
    )
    annotations: AnnotationMap = Field(
        default_factory=dict,
        description="Extra annotations of agent pods. Keys under app.kubernetes.io/ and agents.enterprise.io/ are reserved.",
        json_schema_extra=crd_extra(**{CEL: [_RESERVED_KEYS_RULE]}),
    )
    labels: LabelMap = Field(
        default_factory=dict,
        description="Extra labels of agent pods. Keys under app.kubernetes.io/ and agents.enterprise.io/ are reserved.",
        json_schema_extra=crd_extra(**{CEL: [_RESERVED_KEYS_RULE]}),
    )
    priority_class_name: str | None = Field(
        default=None, description="PriorityClass of agent pods.", max_length=253, pattern=DNS1123_SUBDOMAIN
    )

    @field_validator("labels", "annotations")
    @classmethod
    def _not_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.startswith(RESERVED_PREFIXES):
                raise ValueError(
                    f"key {key!r} uses a prefix reserved for the operator ({', '.join(RESERVED_PREFIXES)})"
                )
        return value


# --- security and compliance ----------------------------------------------------------------------


class AuthModeName(StrEnum):
    LOCAL = "local"
    OIDC = "oidc"


class SecuritySpec(ApiModel):
    """How the runtime authenticates callers and signs its tokens."""

    model_config = ConfigDict(
        json_schema_extra=crd_extra(
            **{
                CEL: [
                    cel(
                        "self.authMode != 'oidc' || (has(self.issuer) && has(self.jwksUri))",
                        "spec.security.issuer and spec.security.jwksUri are required when authMode is oidc",
                        ".issuer",
                    )
                ]
            }
        )
    )

    auth_mode: AuthModeName = Field(
        default=AuthModeName.LOCAL,
        description="local: users from usersSecretRef log in at /v1/auth/login; oidc: bearer tokens from an OIDC issuer.",
    )
    signing_algorithm: SigningAlgorithm = Field(
        default=SigningAlgorithm.EDDSA, description="Algorithm of the tokens the runtime issues."
    )
    issuer: str | None = Field(default=None, description="Token issuer (iss). Required with oidc.", max_length=512)
    audience: str | None = Field(
        default=None, description="Expected token audience (aud). Defaults to the agent name.", max_length=512
    )
    jwks_uri: str | None = Field(
        default=None, description="JWKS URL of the OIDC issuer. Required with oidc.", max_length=2048, pattern=HTTP_URL
    )
    users_secret_ref: LocalObjectReference | None = Field(
        default=None, description="Secret holding the users file (agent-runtime users add prints its lines)."
    )
    token_ttl_seconds: int = Field(
        default=900, alias="tokenTTLSeconds", description="Lifetime of issued access tokens.", ge=60, le=86400
    )
    roles: dict[Annotated[str, Field(max_length=63, pattern=ROLE_NAME_PATTERN)], list[Permission]] | None = Field(
        default=None,
        description="Role to permissions mapping. Defaults to admin, operator, analyst and viewer.",
        max_length=32,
    )

    @model_validator(mode="after")
    def _oidc_needs_issuer(self) -> SecuritySpec:
        if self.auth_mode == AuthModeName.OIDC and (self.issuer is None or self.jwks_uri is None):
            raise ValueError("spec.security.issuer and spec.security.jwksUri are required when authMode is oidc")
        return self


class ComplianceSpec(ApiModel):
    """Regulatory frameworks the runtime enforces."""

    frameworks: list[ComplianceFramework] = Field(
        default_factory=list,
        description="GDPR (consent, export, erasure), HIPAA (PHI encryption and redaction), SOX (maker-checker).",
        max_length=3,
        json_schema_extra=crd_extra(**{"x-kubernetes-list-type": "set"}),
    )
    retention_days: int = Field(default=365, description="Stored results older than this are purged.", ge=1, le=36500)
    financial_operations: list[Annotated[str, Field(max_length=63, pattern=OPERATION_NAME_PATTERN)]] = Field(
        default_factory=list,
        description="Operations that, with SOX, run only after a second person approves them (maker-checker).",
        max_length=64,
        json_schema_extra=crd_extra(**{"x-kubernetes-list-type": "set"}),
    )

    @field_validator("frameworks")
    @classmethod
    def _unique(cls, value: list[ComplianceFramework]) -> list[ComplianceFramework]:
        if len(set(value)) != len(value):
            raise ValueError("frameworks must not repeat")
        return value


# --- scaling --------------------------------------------------------------------------------------


class ScalingPolicyType(StrEnum):
    PODS = "Pods"
    PERCENT = "Percent"


class SelectPolicy(StrEnum):
    MAX = "Max"
    MIN = "Min"
    DISABLED = "Disabled"


class ScalingPolicy(ApiModel):
    """One HPA scaling policy: at most ``value`` pods or percent per ``periodSeconds``."""

    type: ScalingPolicyType = Field(description="Pods or Percent.")
    value: int = Field(description="Pods or percent allowed to change in one period.", ge=1, le=1000)
    period_seconds: int = Field(description="Length of the period.", ge=1, le=1800)


class ScalingRules(ApiModel):
    """HPA behaviour in one direction."""

    stabilization_window_seconds: int = Field(
        description="Past recommendations considered before scaling.", ge=0, le=3600
    )
    select_policy: SelectPolicy = Field(default=SelectPolicy.MAX, description="Which policy wins when several apply.")
    policies: list[ScalingPolicy] = Field(description="Scaling policies.", min_length=1, max_length=10)


def _default_scale_up() -> ScalingRules:
    return ScalingRules(
        stabilization_window_seconds=0,
        policies=[
            ScalingPolicy(type=ScalingPolicyType.PERCENT, value=100, period_seconds=15),
            ScalingPolicy(type=ScalingPolicyType.PODS, value=2, period_seconds=60),
        ],
    )


def _default_scale_down() -> ScalingRules:
    return ScalingRules(
        stabilization_window_seconds=300,
        policies=[ScalingPolicy(type=ScalingPolicyType.PERCENT, value=10, period_seconds=60)],
    )


class ScalingBehavior(ApiModel):
    """Scale-up and scale-down behaviour. Defaults: up fast (100% per 15s or 2 pods per minute), down slowly (10% per minute after 5 minutes)."""

    scale_up: ScalingRules = Field(default_factory=_default_scale_up, description="Behaviour when adding pods.")
    scale_down: ScalingRules = Field(default_factory=_default_scale_down, description="Behaviour when removing pods.")


class AutoscalingSpec(ApiModel):
    """Horizontal autoscaling. The HPA scales the EnterpriseAgent itself through its scale subresource."""

    model_config = ConfigDict(
        json_schema_extra=crd_extra(
            **{
                CEL: [
                    cel(
                        "self.minReplicas <= self.maxReplicas",
                        "spec.autoscaling.minReplicas must be less than or equal to maxReplicas",
                        ".minReplicas",
                    )
                ]
            }
        )
    )

    enabled: bool = Field(default=False, description="Create a HorizontalPodAutoscaler for the agent.")
    min_replicas: int = Field(default=1, description="Fewest replicas the autoscaler keeps.", ge=1, le=1000)
    max_replicas: int = Field(default=10, description="Most replicas the autoscaler creates.", ge=1, le=1000)
    target_cpu_utilization: int = Field(
        default=70,
        alias="targetCPUUtilization",
        description="Average CPU utilization (percent of requests) to keep.",
        ge=1,
        le=500,
    )
    target_memory_utilization: int | None = Field(
        default=80,
        description="Average memory utilization (percent of requests) to keep; omit to scale on CPU only.",
        ge=1,
        le=500,
    )
    behavior: ScalingBehavior = Field(default_factory=ScalingBehavior, description="Scale-up and scale-down policies.")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("spec.autoscaling.minReplicas must be less than or equal to maxReplicas")
        return self


class DisruptionBudgetSpec(ApiModel):
    """The PodDisruptionBudget of the agent."""

    max_unavailable: int = Field(
        default=1, description="Agent pods that voluntary disruptions (drains) may take down at once.", ge=0, le=1000
    )


# --- rollout --------------------------------------------------------------------------------------


class RolloutStrategy(StrEnum):
    BLUE_GREEN = "BlueGreen"


class PromotionMode(StrEnum):
    AUTO = "Auto"
    MANUAL = "Manual"


class SmokeTest(ApiModel):
    """An operation called through the preview Service during analysis."""

    operation: str = Field(
        description="Name of the operation; must be one of spec.operations.",
        max_length=63,
        pattern=OPERATION_NAME_PATTERN,
    )
    payload: dict[str, Any] = Field(
        default_factory=dict,
        description="Request body sent to the operation.",
        json_schema_extra=crd_extra(**{"x-kubernetes-preserve-unknown-fields": True}),
    )
    timeout_seconds: int = Field(default=30, description="How long the smoke call may take.", ge=1, le=600)


class AnalysisSpec(ApiModel):
    """Checks a preview must pass before promotion, and the promoted colour after it."""

    window_seconds: int = Field(
        default=30, description="How long the preview's metrics are observed before judging.", ge=0, le=3600
    )
    max_error_rate: float = Field(
        default=0.05, description="Highest acceptable share of 5xx responses (0 to 1).", ge=0.0, le=1.0
    )
    max_p95_latency_seconds: float = Field(
        default=5.0, description="Highest acceptable p95 request latency.", gt=0.0, le=3600.0
    )
    max_tokens_per_request_ratio: float | None = Field(
        default=None,
        description=(
            "Highest acceptable ratio of the preview's mean tokens (input and output) per chat call to the"
            " stable colour's, from each pod's gen_ai_client_token_usage; 1.5 fails a preview that spends"
            " more than 1.5 times the tokens per call. Unset: not checked. With no chat calls on either"
            " colour the check passes and says so."
        ),
        ge=1.0,
        le=1000.0,
    )
    smoke: SmokeTest | None = Field(default=None, description="Optional smoke operation.")


class RolloutSpec(ApiModel):
    """How a new revision is rolled out."""

    model_config = ConfigDict(
        json_schema_extra=crd_extra(
            **{
                CEL: [
                    cel(
                        "!has(self.promote) || self.promotion == 'Manual'",
                        "spec.rollout.promote may only be set when spec.rollout.promotion is Manual",
                        ".promote",
                    )
                ]
            }
        )
    )

    strategy: RolloutStrategy = Field(
        default=RolloutStrategy.BLUE_GREEN, description="Rollout strategy. BlueGreen is the only one."
    )
    promotion: PromotionMode = Field(
        default=PromotionMode.AUTO, description="Auto promotes after analysis; Manual waits for approval."
    )
    promote: str | None = Field(
        default=None,
        description="Approves the preview revision with this hash (status.previewRevision), so an approval can live in Git.",
        pattern=REVISION_PATTERN,
    )
    auto_promotion_seconds: int = Field(
        default=0, description="With Auto, how long a healthy preview waits before promotion.", ge=0, le=86400
    )
    preview_replicas: int | None = Field(
        default=None, description="Replicas of the preview colour. Defaults to spec.replicas.", ge=1, le=1000
    )
    scale_down_delay_seconds: int = Field(
        default=30,
        description="How long the old colour is kept after promotion; a fast rollback is possible meanwhile.",
        ge=0,
        le=86400,
    )
    progress_deadline_seconds: int = Field(
        default=600,
        description="A preview not Ready and analysed by then is aborted and marked Degraded (waiting for a manual approval does not count).",
        ge=30,
        le=86400,
    )
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec, description="Analysis thresholds.")

    @model_validator(mode="after")
    def _promote_only_manual(self) -> RolloutSpec:
        if self.promote is not None and self.promotion != PromotionMode.MANUAL:
            raise ValueError("spec.rollout.promote may only be set when spec.rollout.promotion is Manual")
        return self


# --- observability and network --------------------------------------------------------------------


class ServiceMonitorSpec(ApiModel):
    """A Prometheus Operator ServiceMonitor for the agent's /metrics."""

    enabled: bool = Field(default=False, description="Create a ServiceMonitor (needs the Prometheus Operator's CRDs).")
    interval: str = Field(default="30s", description="Scrape interval.", pattern=r"^[0-9]+(ms|s|m|h)$", max_length=16)


class ObservabilitySpec(ApiModel):
    """Traces and metrics."""

    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP endpoint that receives traces; none disables export.",
        max_length=2048,
        pattern=HTTP_URL,
    )
    trace_sample_ratio: float = Field(default=0.1, description="Share of new traces sampled (0 to 1).", ge=0.0, le=1.0)
    service_monitor: ServiceMonitorSpec = Field(
        default_factory=ServiceMonitorSpec, description="Prometheus Operator scraping."
    )


class NetworkPolicySpec(ApiModel):
    """Who may reach the agent, and where it may connect. Traffic not listed is denied."""

    enabled: bool = Field(default=True, description="Create a NetworkPolicy for the agent pods.")
    allowed_ingress_namespaces: list[Annotated[str, Field(max_length=63, pattern=DNS1123_LABEL)]] = Field(
        default_factory=list,
        description="Namespaces whose pods may call the agent (its own namespace and the operator's always may).",
        max_length=64,
    )
    allowed_ingress_pod_labels: LabelMap = Field(
        default_factory=dict,
        description="Pods of the agent's namespace with these labels may call the agent; empty allows all pods of the namespace.",
    )
    allowed_egress_cidrs: list[Cidr] = Field(
        default_factory=list,
        alias="allowedEgressCIDRs",
        description="CIDRs of model and tool endpoints the agent may connect to.",
        max_length=64,
    )
    allowed_egress_hosts: list[Annotated[str, Field(max_length=253, pattern=HOSTNAME)]] = Field(
        default_factory=list,
        description="Host names the runtime may call; enforced by the runtime, since a NetworkPolicy cannot name hosts.",
        max_length=64,
    )
    egress_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=lambda: [443], description="TCP ports allowed towards allowedEgressCIDRs.", max_length=16
    )

    @field_validator("allowed_egress_cidrs")
    @classmethod
    def _valid_cidrs(cls, value: list[str]) -> list[str]:
        return check_cidrs(value)


# --- state ----------------------------------------------------------------------------------------


class _NamedSecret(ApiModel):
    name: str = Field(
        description="Name of the Secret, in the agent's namespace.",
        min_length=1,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
    )


class SecretKeySelector(_NamedSecret):
    """One key of a Secret in the agent's namespace."""

    key: str = Field(
        default="uri",
        description="The key holding the value. Defaults to uri, the key of the connection URI in the app Secret CloudNativePG creates.",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
    )


class DatabaseEgress(ApiModel):
    """Where the database is, for the agent's NetworkPolicy: an egress rule to these peers on ``port``.
    CIDRs become ipBlock peers; namespaceSelector and podSelector together become one peer, as in a
    NetworkPolicy (podSelector alone: pods of the agent's namespace; namespaceSelector alone: every
    pod of the matching namespaces)."""

    model_config = ConfigDict(
        json_schema_extra=crd_extra(
            **{
                CEL: [
                    cel(
                        "(has(self.cidrs) && size(self.cidrs) > 0) || has(self.namespaceSelector) || has(self.podSelector)",
                        "spec.state.postgres.egress must set cidrs, namespaceSelector or podSelector",
                    ),
                    cel(
                        "(!has(self.podSelector) || size(self.podSelector) > 0) && (!has(self.namespaceSelector)"
                        " || size(self.namespaceSelector) > 0 || (has(self.podSelector) && size(self.podSelector) > 0))",
                        "spec.state.postgres.egress: an empty selector admits every pod; name the database's labels",
                    ),
                    cel(
                        "!has(self.cidrs) || self.cidrs.all(c, !c.endsWith('/0'))",
                        "spec.state.postgres.egress.cidrs: /0 admits every address; name the database's",
                    ),
                ]
            }
        )
    )

    cidrs: list[Cidr] = Field(
        default_factory=list, description="CIDRs of the database's addresses, such as 10.30.0.0/24.", max_length=16
    )
    namespace_selector: LabelMap | None = Field(
        default=None,
        description="Labels (matchLabels) of the namespaces the database pods run in, such as kubernetes.io/metadata.name: databases; empty (every namespace) only with a podSelector.",
    )
    pod_selector: LabelMap | None = Field(
        default=None,
        description="Labels (matchLabels) of the database pods, such as cnpg.io/cluster: support-bot-db; without namespaceSelector, pods of the agent's namespace.",
    )
    port: int = Field(default=5432, description="TCP port of the database.", ge=1, le=65535)

    @field_validator("cidrs")
    @classmethod
    def _valid_cidrs(cls, value: list[str]) -> list[str]:
        return check_cidrs(value)

    @model_validator(mode="after")
    def _has_a_peer(self) -> DatabaseEgress:
        if not self.cidrs and self.namespace_selector is None and self.pod_selector is None:
            raise ValueError("spec.state.postgres.egress must set cidrs, namespaceSelector or podSelector")
        # A database is somewhere in particular: a rule that opens the port to everything is a mistake.
        if self.pod_selector == {} or (self.namespace_selector == {} and not self.pod_selector):
            raise ValueError(
                "spec.state.postgres.egress: an empty selector admits every pod; name the database's labels"
            )
        if any(cidr.endswith("/0") for cidr in self.cidrs):
            raise ValueError("spec.state.postgres.egress.cidrs: /0 admits every address; name the database's")
        return self


class PostgresState(ApiModel):
    """PostgreSQL as the state every replica shares."""

    secret_ref: SecretKeySelector = Field(
        description=(
            f"The Secret key holding the connection URI (postgresql://user:password@host:5432/db). It reaches the"
            f" agent container only as the {DATABASE_URL_ENV} environment variable (valueFrom.secretKeyRef), never"
            " through the ConfigMap, status or annotations. A missing Secret or key stalls the agent."
        )
    )
    egress: DatabaseEgress | None = Field(
        default=None,
        description="Admits connections to the database in the agent's NetworkPolicy. Without it, only spec.networkPolicy.allowedEgressCIDRs and egressPorts do.",
    )


class StateSpec(ApiModel):
    """Where the agent keeps what its replicas must agree on: token revocations (logout), GDPR consents,
    SOX approvals, stored reports and login throttling."""

    postgres: PostgresState | None = Field(
        default=None,
        description="A PostgreSQL database shared by every replica. Without it each replica keeps its own embedded SQLite store, which is right for one replica only.",
    )


# --- model and limits -----------------------------------------------------------------------------

_IPV4 = r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_IN_CEL = _IPV4.replace("\\", "\\\\")  # inside a CEL string literal, a backslash is escaped
_NUMERIC_HOST_MESSAGE = "has a numeric host that is not an IPv4 address (four parts of 0-255, no leading zeros)"


def check_base_url(value: str) -> str:
    """Refuses what the CRD's pattern refuses, with a reason: a URL that is not http(s)://host[:port]
    [/path], and above all one carrying a secret (user:password@, a ?key= query), which would be
    written into the runtime ConfigMap. Messages never repeat the URL, which may hold that secret."""
    scheme = value.partition("://")[0].lower() if "://" in value else ""
    if scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL, such as https://api.openai.com/v1")
    authority = value.partition("://")[2].split("/", 1)[0]
    if "@" in authority.split("?", 1)[0].split("#", 1)[0]:
        raise ValueError(
            "must not carry credentials (user:password@): the URL is written into the runtime ConfigMap;"
            " put the key in a Secret and name it in spec.model.apiKeySecretRef"
        )
    if "?" in value or "#" in value:
        raise ValueError(
            "must not have a query or fragment: the URL is written into the runtime ConfigMap, and the"
            " runtime appends /chat/completions to it"
        )
    if re.fullmatch(MODEL_BASE_URL, value) is None:
        raise ValueError(
            "must be http(s)://host[:port][/path] with a DNS name or IP address as host and a port of 1-65535"
        )
    host = urlsplit(value).hostname or ""
    if value.partition("://")[2].startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("has a bracketed host that is not an IPv6 address") from None
    elif re.fullmatch(r"[0-9.]+", host) and re.fullmatch(_IPV4, host) is None:
        # 010.0.0.1 or 10.0.0.256: no DNS name, and a resolver may read it as another address.
        raise ValueError(_NUMERIC_HOST_MESSAGE)
    return value


class SecretKeyReference(_NamedSecret):
    """One key of a Secret in the agent's namespace."""

    key: str = Field(
        description="The key holding the value.", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$"
    )


class ModelCABundle(ApiModel):
    """A ConfigMap key holding the PEM certificates of the CAs that sign the endpoint's certificate."""

    config_map_ref: LocalObjectReference = Field(
        description="The ConfigMap, in the agent's namespace (cert-manager's trust-manager can fill one)."
    )
    key: str = Field(
        default="ca.crt",
        description=f"The key holding the PEM bundle; mounted read-only at {MODEL_CA_FILE}. Defaults to ca.crt.",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
    )


class ModelSpec(ApiModel):
    """The language model the runtime's chat operation calls."""

    model_config = ConfigDict(
        json_schema_extra=crd_extra(
            **{
                CEL: [
                    cel(
                        "self.connectTimeoutSeconds <= self.timeoutSeconds",
                        "spec.model.connectTimeoutSeconds must be less than or equal to spec.model.timeoutSeconds",
                        ".connectTimeoutSeconds",
                    )
                ]
            }
        )
    )

    provider: ModelProvider = Field(
        default=ModelProvider.OPENAI,
        description=(
            "API the endpoint speaks. openai: OpenAI's chat completions API, as OpenAI, Azure OpenAI's v1 API,"
            " vLLM, Ollama, LiteLLM and most gateways serve it."
        ),
    )
    base_url: str = Field(
        description=(
            "Base URL of the API as OpenAI's SDKs take it, such as https://api.openai.com/v1; the runtime"
            " appends /chat/completions. http or https, no credentials, query or fragment (it is written"
            " into the runtime ConfigMap). Its host joins the runtime's egress allow-list; for the"
            " NetworkPolicy see egressCIDRs."
        ),
        min_length=1,
        max_length=2048,
        json_schema_extra=crd_extra(
            **{
                "pattern": MODEL_BASE_URL,
                CEL: [
                    cel(
                        "!self.matches('^[A-Za-z]+://[^/?#]*@')",
                        "spec.model.baseUrl must not carry credentials (user:password@): it is written into the"
                        " runtime ConfigMap; name the key's Secret in spec.model.apiKeySecretRef",
                    ),
                    cel(
                        "!self.matches('^https?://[0-9.]+(:[0-9]+)?(/.*)?$')"
                        f" || self.matches('^https?://{_IPV4_IN_CEL}(:[0-9]+)?(/.*)?$')",
                        f"spec.model.baseUrl {_NUMERIC_HOST_MESSAGE}",
                    ),
                    cel(
                        "!self.contains('?') && !self.contains('#')",
                        "spec.model.baseUrl must not have a query or fragment: it is written into the runtime"
                        " ConfigMap, and /chat/completions is appended to it",
                    ),
                ],
            }
        ),
    )
    model: str = Field(
        description="Model name sent with every request, such as gpt-4o-mini or meta-llama/Llama-3.1-8B-Instruct.",
        min_length=1,
        max_length=256,
        pattern=r"^[^\s]+$",
    )
    api_key_secret_ref: SecretKeyReference | None = Field(
        default=None,
        description=(
            f"The Secret key holding the API key. It reaches the agent container only as the {MODEL_API_KEY_ENV}"
            " environment variable (valueFrom.secretKeyRef), never through the ConfigMap, status or annotations,"
            " and is sent as a bearer token. Omit it for an endpoint that needs no key. A missing Secret or"
            " key stalls the agent."
        ),
    )
    ca_bundle: ModelCABundle | None = Field(
        default=None,
        description=(
            f"CAs trusted for the endpoint instead of the system's (a private endpoint), mounted at {MODEL_CA_DIR}."
            " A missing ConfigMap or key stalls the agent."
        ),
    )
    connect_timeout_seconds: int = Field(
        default=10, description="How long connecting to the endpoint may take.", ge=1, le=600
    )
    timeout_seconds: int = Field(
        default=60, description="How long one model call may take in all, a streamed answer included.", ge=1, le=3600
    )
    max_output_tokens: int = Field(
        default=4096,
        description="Most tokens one answer may have; a caller's max_tokens above it is lowered to it.",
        ge=1,
        le=1_000_000,
    )
    egress_cidrs: list[Cidr] = Field(
        default_factory=list,
        alias="egressCIDRs",
        description=(
            "CIDRs of the endpoint's addresses: the NetworkPolicy admits connections to them on the URL's port."
            " Not needed when baseUrl's host is an IP address (that address is admitted); a host name's"
            " addresses are not known to a NetworkPolicy, so list them here (or in"
            " spec.networkPolicy.allowedEgressCIDRs)."
        ),
        max_length=16,
    )

    @field_validator("base_url")
    @classmethod
    def _valid_base_url(cls, value: str) -> str:
        return check_base_url(value)

    @field_validator("egress_cidrs")
    @classmethod
    def _valid_cidrs(cls, value: list[str]) -> list[str]:
        return check_cidrs(value)

    @model_validator(mode="after")
    def _timeouts_ordered(self) -> ModelSpec:
        if self.connect_timeout_seconds > self.timeout_seconds:
            raise ValueError("spec.model.connectTimeoutSeconds must be less than or equal to spec.model.timeoutSeconds")
        return self

    @property
    def host(self) -> str:
        """The endpoint's host as the runtime's egress allow-list matches it: lower case, no brackets."""
        return (urlsplit(self.base_url).hostname or "").lower()

    @property
    def port(self) -> int:
        """The endpoint's TCP port: the URL's own, or the scheme's (443 for https, 80 for http)."""
        parts = urlsplit(self.base_url)
        return parts.port or (443 if parts.scheme.lower() == "https" else 80)

    def endpoint_cidrs(self) -> list[str]:
        """The CIDRs the NetworkPolicy admits for the endpoint: its IP address, when the host is one,
        then egressCIDRs, each once."""
        cidrs: list[str] = []
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            pass
        else:
            cidrs.append(str(ipaddress.ip_network(address)))
        return list(dict.fromkeys([*cidrs, *self.egress_cidrs]))


class RateLimitSpec(ApiModel):
    """Limits over sliding windows; a limit left out is no limit."""

    requests_per_minute: int | None = Field(
        default=None, description="Most requests in any 60 seconds.", ge=1, le=10_000_000
    )
    tokens_per_hour: int | None = Field(
        default=None,
        description="Most model tokens (prompt and completion) in any hour.",
        ge=1,
        le=1_000_000_000_000,
    )
    tokens_per_day: int | None = Field(
        default=None,
        description="Most model tokens (prompt and completion) in any 24 hours.",
        ge=1,
        le=1_000_000_000_000,
    )


class LimitsSpec(ApiModel):
    """Rate limits and token budgets the runtime enforces: it refuses a request over one."""

    per_caller: RateLimitSpec = Field(
        default_factory=RateLimitSpec, description="Limits of each caller (the token's subject) on its own."
    )
    per_agent: RateLimitSpec = Field(
        default_factory=RateLimitSpec,
        description="Limits of all callers together; every replica counts against them when the replicas share spec.state.postgres, each replica on its own otherwise.",
    )


# Operations the runtime registers only with a model (chat): enabling one needs spec.model.
MODEL_OPERATIONS = [name for name, info in BUILTIN_OPERATIONS.items() if info.needs_model]


# --- the agent ------------------------------------------------------------------------------------


class PullPolicy(StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class EnterpriseAgentSpec(ApiModel):
    """Desired state of an AI agent."""

    model_config = ConfigDict(
        json_schema_extra=crd_extra(
            **{
                CEL: [
                    cel(
                        "!has(self.rollout.previewReplicas) || self.rollout.previewReplicas <= self.replicas",
                        "spec.rollout.previewReplicas must be less than or equal to spec.replicas",
                        ".rollout.previewReplicas",
                    ),
                    cel(
                        "!has(self.rollout.analysis.smoke) || (has(self.operations) && self.rollout.analysis.smoke.operation in self.operations)",
                        "spec.rollout.analysis.smoke.operation must be one of spec.operations",
                        ".rollout.analysis.smoke.operation",
                    ),
                    cel(
                        "!has(self.compliance.frameworks) || !('HIPAA' in self.compliance.frameworks) || self.securityLevel in ['confidential', 'restricted']",
                        "spec.securityLevel must be confidential or restricted when spec.compliance.frameworks has HIPAA",
                        ".securityLevel",
                    ),
                    cel(
                        "!has(self.compliance.financialOperations) || self.compliance.financialOperations.all(o, has(self.operations) && o in self.operations)",
                        "spec.compliance.financialOperations must be among spec.operations",
                        ".compliance.financialOperations",
                    ),
                    cel(
                        "!has(self.env) || self.env.all(e, !e.name.startsWith('AGENT_'))",
                        "spec.env names starting with AGENT_ are reserved for the operator",
                        ".env",
                    ),
                    cel(
                        f"!has(self.env) || self.env.all(e, e.name != '{DATABASE_URL_ENV}')",
                        f"spec.env must not set {DATABASE_URL_ENV}: the operator sets it from spec.state.postgres.secretRef",
                        ".env",
                    ),
                    cel(
                        f"!has(self.model) || !has(self.env) || self.env.all(e, e.name != '{MODEL_API_KEY_ENV}')",
                        f"spec.env must not set {MODEL_API_KEY_ENV} when spec.model is set: the operator sets it from"
                        " spec.model.apiKeySecretRef",
                        ".env",
                    ),
                    cel(
                        f"has(self.model) || !has(self.operations) || !self.operations.exists(o, o in {MODEL_OPERATIONS!r})",
                        f"spec.model is required when spec.operations has {' or '.join(MODEL_OPERATIONS)}",
                        ".operations",
                    ),
                ]
            }
        )
    )

    image: str = Field(
        description="Container image of the agent, such as registry.example/support-bot:2.1.0.",
        min_length=1,
        max_length=512,
        pattern=IMAGE_REFERENCE,
    )
    image_pull_policy: PullPolicy = Field(
        default=PullPolicy.IF_NOT_PRESENT, description="When the kubelet pulls the image."
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, description="Secrets for pulling the image.", max_length=16
    )
    replicas: int = Field(
        default=1, description="Replicas of the active colour. The autoscaler sets this when enabled.", ge=0, le=1000
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="Compute resources of the agent container."
    )
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables.", max_length=128)
    env_from: list[EnvFromSource] = Field(
        default_factory=list, description="ConfigMaps and Secrets imported as environment variables.", max_length=32
    )
    operations: list[Annotated[str, Field(max_length=63, pattern=OPERATION_NAME_PATTERN)]] = Field(
        default_factory=list,
        description="Names of the operation handlers the runtime enables.",
        max_length=64,
        json_schema_extra=crd_extra(**{"x-kubernetes-list-type": "set"}),
    )
    security_level: SecurityLevel = Field(
        default=SecurityLevel.INTERNAL,
        description="Highest data classification the agent may handle: public < internal < confidential < restricted.",
    )
    security: SecuritySpec = Field(default_factory=SecuritySpec, description="Authentication and token settings.")
    compliance: ComplianceSpec = Field(default_factory=ComplianceSpec, description="Compliance frameworks.")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Horizontal autoscaling.")
    disruption_budget: DisruptionBudgetSpec = Field(
        default_factory=DisruptionBudgetSpec, description="PodDisruptionBudget settings."
    )
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Blue-green rollout settings.")
    observability: ObservabilitySpec = Field(default_factory=ObservabilitySpec, description="Tracing and metrics.")
    network_policy: NetworkPolicySpec = Field(
        default_factory=NetworkPolicySpec, description="Ingress and egress rules."
    )
    pod: PodOverrides = Field(default_factory=PodOverrides, description="Scheduling and metadata of the agent pods.")
    state: StateSpec = Field(
        default_factory=StateSpec,
        description="Where the replicas keep the state they must share. Required in practice with more than one replica.",
    )
    data_volume_size_limit: Quantity = Field(
        default="1Gi", description="Size limit of the /var/lib/agent emptyDir (audit log, embedded store)."
    )
    model: ModelSpec | None = Field(
        default=None,
        description=f"The language model the chat operation calls; required with {', '.join(MODEL_OPERATIONS)}.",
    )
    limits: LimitsSpec = Field(
        default_factory=LimitsSpec, description="Rate limits and token budgets, per caller and for the whole agent."
    )

    @field_validator("operations")
    @classmethod
    def _operations_unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("operation names must not repeat")
        return value

    @field_validator("env")
    @classmethod
    def _env_not_reserved(cls, value: list[EnvVar]) -> list[EnvVar]:
        for index, var in enumerate(value):
            if var.name.startswith("AGENT_"):
                raise ValueError(f"[{index}].name: {var.name!r} starts with AGENT_, which is reserved for the operator")
            if var.name == DATABASE_URL_ENV:
                raise ValueError(
                    f"[{index}].name: {DATABASE_URL_ENV} is set by the operator from spec.state.postgres.secretRef"
                )
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> EnterpriseAgentSpec:
        if self.rollout.preview_replicas is not None and self.rollout.preview_replicas > self.replicas:
            raise ValueError("spec.rollout.previewReplicas must be less than or equal to spec.replicas")
        smoke = self.rollout.analysis.smoke
        if smoke is not None and smoke.operation not in self.operations:
            raise ValueError("spec.rollout.analysis.smoke.operation must be one of spec.operations")
        unknown_financial = [name for name in self.compliance.financial_operations if name not in self.operations]
        if unknown_financial:
            raise ValueError(
                f"spec.compliance.financialOperations must be among spec.operations (not: {', '.join(unknown_financial)})"
            )
        if ComplianceFramework.HIPAA in self.compliance.frameworks and not self.security_level.allows(
            SecurityLevel.CONFIDENTIAL
        ):
            raise ValueError(
                "spec.securityLevel must be confidential or restricted when spec.compliance.frameworks has HIPAA"
            )
        if self.model is None and any(name in MODEL_OPERATIONS for name in self.operations):
            raise ValueError(f"spec.model is required when spec.operations has {' or '.join(MODEL_OPERATIONS)}")
        if self.model is not None:
            for index, var in enumerate(self.env):
                if var.name == MODEL_API_KEY_ENV:
                    raise ValueError(
                        f"spec.env[{index}].name must not be {MODEL_API_KEY_ENV} when spec.model is set: the"
                        " operator sets it from spec.model.apiKeySecretRef"
                    )
        return self


# --- status ---------------------------------------------------------------------------------------


class Color(StrEnum):
    BLUE = "blue"
    GREEN = "green"

    @property
    def other(self) -> Color:
        return Color.GREEN if self is Color.BLUE else Color.BLUE


class Phase(StrEnum):
    PENDING = "Pending"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    READY = "Ready"
    DEGRADED = "Degraded"
    STALLED = "Stalled"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ConditionType(StrEnum):
    """kstatus' three (so Flux and kpt read the agent) plus Progressing and Degraded (Argo CD), and
    SharedStateMissing: a warning (abnormal when True) that neither stalls the agent nor keeps it
    from being Ready."""

    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"
    SHARED_STATE_MISSING = "SharedStateMissing"


def _one_of(values: type[StrEnum]) -> str:
    names = [str(value) for value in values]
    return ", ".join(names[:-1]) + " or " + names[-1]


class StatusModel(ApiModel):
    """Base of the status models. ``model_copy(update=...)`` validates the result, as building one
    does, so an updated status holds only what the CRD accepts (a long message is cut to its
    bound): pydantic's own model_copy skips validation."""

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        if not update:
            return copied
        return type(self).model_validate({name: getattr(copied, name) for name in type(self).model_fields})


# The status's message fields: cut to their bound when read or built (before the length check, so
# a long message is shortened, never refused) and again when written, and declared with that
# maxLength in the CRD.
ConditionMessage = Annotated[
    str,
    BeforeValidator(_cut_to(MAX_CONDITION_MESSAGE_LENGTH)),
    PlainSerializer(_cut_to(MAX_CONDITION_MESSAGE_LENGTH), return_type=str),
    Field(max_length=MAX_CONDITION_MESSAGE_LENGTH, description="A human-readable message."),
]
CheckMessage = Annotated[
    str,
    BeforeValidator(_cut_to(MAX_CHECK_MESSAGE_LENGTH)),
    PlainSerializer(_cut_to(MAX_CHECK_MESSAGE_LENGTH), return_type=str),
    Field(max_length=MAX_CHECK_MESSAGE_LENGTH, description="What was measured."),
]
RolloutMessage = Annotated[
    str,
    BeforeValidator(_cut_to(MAX_MESSAGE_LENGTH)),
    PlainSerializer(_cut_to(MAX_MESSAGE_LENGTH), return_type=str),
    Field(max_length=MAX_MESSAGE_LENGTH, description="A human-readable note on the rollout."),
]
StatusMessage = Annotated[
    str,
    BeforeValidator(_cut_to(MAX_MESSAGE_LENGTH)),
    PlainSerializer(_cut_to(MAX_MESSAGE_LENGTH), return_type=str),
    Field(max_length=MAX_MESSAGE_LENGTH, description="A short explanation of the phase."),
]


class Condition(StatusModel):
    """A status condition, as in metav1.Condition."""

    type: str = Field(description=f"Condition type: {_one_of(ConditionType)}.", max_length=316)
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        description="A CamelCase reason.", max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    )
    message: ConditionMessage = ""
    last_transition_time: str = Field(description="When the status last changed (RFC 3339).", max_length=64)
    observed_generation: int = Field(default=0, description="The .metadata.generation the condition was set for.", ge=0)


class AnalysisResult(StrEnum):
    PENDING = "Pending"
    PASSED = "Passed"
    FAILED = "Failed"
    SKIPPED = "Skipped"


class CheckName(StrEnum):
    """The analysis checks, in the order they are recorded (endpoints first)."""

    ENDPOINTS = "endpoints"
    READYZ = "readyz"
    ERROR_RATE = "errorRate"
    LATENCY = "latency"
    TOKENS_PER_REQUEST = "tokensPerRequest"
    SMOKE = "smoke"


class AnalysisCheck(StatusModel):
    """The result of one analysis check."""

    name: CheckName = Field(description=f"Check name: {_one_of(CheckName)}.")
    result: AnalysisResult = Field(description="Pending, Passed, Failed, or Skipped when it cannot run here.")
    message: CheckMessage = ""
    observed_at: str | None = Field(default=None, description="When the check last ran (RFC 3339).", max_length=64)


class Step(StrEnum):
    """The steps of a blue-green rollout, in order; Aborted can follow any step before Completed."""

    PREVIEW = "Preview"
    ANALYSIS = "Analysis"
    AWAITING_PROMOTION = "AwaitingPromotion"
    PROMOTING = "Promoting"
    POST_PROMOTION = "PostPromotion"
    COMPLETED = "Completed"
    ABORTED = "Aborted"


class AbortReason(StrEnum):
    ABORTED = "Aborted"
    ANALYSIS_FAILED = "AnalysisFailed"
    PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"


class RolloutStatus(StatusModel):
    """Progress of the current rollout."""

    step: Step | None = Field(default=None, description=f"The rollout's step: {_one_of(Step)}.")
    preview_color: Color | None = Field(default=None, description="Colour the preview runs in.")
    started_at: str | None = Field(default=None, description="When the rollout started.", max_length=64)
    preview_ready_at: str | None = Field(
        default=None, description="When the preview was Ready and in its Service's endpoints.", max_length=64
    )
    promoted_at: str | None = Field(default=None, description="When traffic switched to the new colour.", max_length=64)
    previous_revision: str | None = Field(
        default=None, description="Revision that served traffic before the promotion.", max_length=63
    )
    abort_reason: AbortReason | None = Field(
        default=None, description=f"Why the rollout was aborted: {_one_of(AbortReason)}."
    )
    retried_for: str | None = Field(
        default=None, description="The last retry request served (the retry annotation's value).", max_length=128
    )
    analysis: list[AnalysisCheck] = Field(default_factory=list, description="Analysis check results.", max_length=16)
    waiting_since: str | None = Field(
        default=None,
        description=(
            "Since when the step has been waiting for the colour it checks to be ready again (a scale in"
            " progress, an evicted pod) or for a requested check that could not run; cleared when it is."
            " A wait longer than spec.rollout.progressDeadlineSeconds aborts the rollout."
        ),
        max_length=64,
    )
    unanswered_measurements: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description=(
            "Consecutive measurements of the preview in which a pod did not answer (a check left Pending:"
            " connection refused, no connection within 5 s); cleared by one every pod answered. More than"
            " 4 fail the analysis, as Argo Rollouts' consecutiveErrorLimit does."
        ),
    )
    message: RolloutMessage | None = None


class UndoResult(StrEnum):
    UNDONE = "Undone"
    REFUSED = "Refused"


class UndoStatus(StatusModel):
    """The operator's answer to the last undo request (the agents.enterprise.io/undo annotation)."""

    request: str = Field(
        description="The undo annotation's value answered: each request is answered once.", max_length=128
    )
    result: UndoResult = Field(description=f"The answer: {_one_of(UndoResult)}.")
    revision: str | None = Field(default=None, description="The revision whose spec was put back.", max_length=63)
    message: RolloutMessage | None = None  # what the operator did, or why it could not


class EnterpriseAgentStatus(StatusModel):
    """Observed state of an agent, written by the operator."""

    phase: Phase | None = Field(default=None, description="A one-word summary for humans.")
    message: StatusMessage | None = None
    observed_generation: int | None = Field(default=None, description="The .metadata.generation last acted upon.", ge=0)
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Reconciling, Stalled (kstatus), Progressing, Degraded and the warning SharedStateMissing.",
        max_length=16,
        json_schema_extra=crd_extra(**{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}),
    )
    active_color: Color | None = Field(default=None, description="Colour the active Service points at.")
    active_revision: str | None = Field(default=None, description="Revision serving traffic.", max_length=63)
    preview_revision: str | None = Field(default=None, description="Revision under rollout, if any.", max_length=63)
    replicas: int | None = Field(default=None, description="Pods of the active colour.", ge=0)
    ready_replicas: int | None = Field(default=None, description="Ready pods of the active colour.", ge=0)
    selector: str | None = Field(
        default=None, description="Label selector of the active pods, for the scale subresource.", max_length=1024
    )
    image: str | None = Field(default=None, description="Image of the active revision.", max_length=512)
    rollout: RolloutStatus | None = Field(default=None, description="Progress of the current rollout.")
    abort_request_seen: str | None = Field(
        default=None,
        description=(
            "The abort annotation's value when the operator last acted: an abort request acts once, when it"
            " appears or changes, so a later rollout of the same revision is not aborted by it."
        ),
        max_length=128,
    )
    last_undo: UndoStatus | None = Field(default=None, description="The answer to the last undo request.")


def read_status(raw: Any) -> EnterpriseAgentStatus:
    """The status as an operator wrote it. What the models cannot read (a field a newer operator
    added, a hand edit the CRD schema let through, a step this version does not know) is left
    out field by field, never the whole status: losing activeColor or activeRevision would make
    the next reconcile take the serving colour down."""
    if not isinstance(raw, dict):
        return EnterpriseAgentStatus()
    try:
        return EnterpriseAgentStatus.model_validate(raw)
    except ValueError:  # pydantic's ValidationError is a ValueError
        kept = _readable_fields(EnterpriseAgentStatus, raw)
        rollout = raw.get("rollout")
        if "rollout" not in kept and isinstance(rollout, dict):
            kept["rollout"] = _readable_fields(RolloutStatus, rollout)
        return EnterpriseAgentStatus.model_validate(kept)


def _readable_fields(model: type[ApiModel], raw: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``raw`` that ``model`` reads on their own (every field of it is optional)."""
    kept: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            model.model_validate({key: value})
        except ValueError:
            continue
        kept[key] = value
    return kept


# --- the object -----------------------------------------------------------------------------------


class ObjectMeta(BaseModel):
    """The metadata fields the operator reads. Other metadata is ignored, not rejected."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True, alias_generator=to_camel)

    name: str = Field(min_length=1, max_length=AGENT_NAME_MAX_LENGTH, pattern=AGENT_NAME_PATTERN)
    namespace: str = Field(default="default", max_length=63, pattern=DNS1123_LABEL)
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class EnterpriseAgent(BaseModel):
    """A whole EnterpriseAgent object as read from a manifest or the API."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, alias_generator=to_camel)

    api_version: str = Field(pattern=f"^{GROUP.replace('.', r'[.]')}/{VERSION}$")
    kind: str = Field(pattern=f"^{KIND}$")
    metadata: ObjectMeta
    spec: EnterpriseAgentSpec
    status: EnterpriseAgentStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

"""Reading EnterpriseAgent manifests from YAML, with errors that name the field."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml
from pydantic import ValidationError

from agent_operator.crd import build_crd
from agent_operator.spec import EnterpriseAgent

# The API server refuses objects over about 1.5 MB; a manifest file larger than this is not one.
MAX_MANIFEST_BYTES = 1_048_576


@dataclass(frozen=True)
class FieldError:
    """One problem with a manifest: where (a field path such as spec.autoscaling.minReplicas) and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class ManifestError(Exception):
    """A manifest that cannot be accepted; ``errors`` lists every problem found."""

    def __init__(self, source: str, errors: Iterable[FieldError]) -> None:
        self.source = source
        self.errors = list(errors)
        super().__init__("\n".join(f"{source}: {error}" for error in self.errors))


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases (the "billion laughs" expansion) and duplicate keys
    (which the API server's strict decoding refuses too, and which would silently lose a value)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases are not accepted in agent manifests", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Plain scalars resolved as kubectl, Argo CD and Flux resolve them (sigs.k8s.io/yaml, go-yaml v2),
# not as PyYAML does: "y" and "n" are booleans, "1e3" and "0o17" are numbers, while timestamps
# ("2026-01-01") and sexagesimals ("1:20") stay strings. Otherwise offline render would accept
# `value: y` for a string field, which `kubectl apply` sends as a boolean and the server refuses.
_GO_BOOLS = {
    **dict.fromkeys(["y", "Y", "yes", "Yes", "YES", "on", "On", "ON", "true", "True", "TRUE"], True),
    **dict.fromkeys(["n", "N", "no", "No", "NO", "off", "Off", "OFF", "false", "False", "FALSE"], False),
}
_GO_NULLS = {"", "~", "null", "Null", "NULL"}
_GO_SPECIAL_FLOATS = {
    **dict.fromkeys([".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"], math.inf),
    **dict.fromkeys(["-.inf", "-.Inf", "-.INF"], -math.inf),
    **dict.fromkeys([".nan", ".NaN", ".NAN"], math.nan),
}
_GO_INT = re.compile(r"([-+]?)(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)")
_GO_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _go_scalar(text: str) -> Any:
    """The value go-yaml v2 gives a plain scalar decoded into an interface{}."""
    if text in _GO_BOOLS:
        return _GO_BOOLS[text]
    if text in _GO_NULLS:
        return None
    if text in _GO_SPECIAL_FLOATS:
        return _GO_SPECIAL_FLOATS[text]
    plain = text.replace("_", "") if text[:1] not in ("", ".") else text
    number = _GO_INT.fullmatch(plain)
    if number is not None:
        sign, digits = number.groups()
        base = 0 if digits[:2].lower() in ("0x", "0o", "0b") else (8 if len(digits) > 1 and digits[0] == "0" else 10)
        value = int(digits, base) * (-1 if sign == "-" else 1)
        if -(2**63) <= value < 2**64:
            return value
    if _GO_FLOAT.fullmatch(plain):
        return float(plain)
    return text


_GO_SCALAR_TAG = "tag:eao:go-scalar"


class _KubectlLoader(_StrictLoader):
    """The strict loader with go-yaml v2's resolution of plain scalars."""

    def construct_go_scalar(self, node: yaml.ScalarNode) -> Any:
        return _go_scalar(self.construct_scalar(node))

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # JSON has only string keys: sigs.k8s.io/yaml writes a boolean or number key as text.
        mapping = super().construct_mapping(node, deep=deep)
        return {
            (str(k).lower() if isinstance(k, bool) else str(k) if isinstance(k, int) else k): v
            for k, v in mapping.items()
        }


_KubectlLoader.yaml_implicit_resolvers = {}
_KubectlLoader.add_implicit_resolver(_GO_SCALAR_TAG, re.compile(r".*", re.DOTALL), None)
_KubectlLoader.add_constructor(_GO_SCALAR_TAG, _KubectlLoader.construct_go_scalar)


# --- the CRD's structural schema, checked before the models ---------------------------------------


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def _json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _conform(value: Any, schema: Mapping[str, Any], path: str, errors: list[FieldError]) -> Any:
    """``value`` as the API server sees it against ``schema`` (a structural OpenAPI schema): null
    fields pruned, integral floats taken as integers (kubectl sends 3.0 as 3). A value of the wrong
    JSON type is an error, as the server makes it: the models would coerce "3" to 3 or "yes" to True."""
    if isinstance(value, float) and not math.isfinite(value):
        errors.append(FieldError(path, f"{value} is not a number JSON can carry"))
        return value
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int | str):
            errors.append(FieldError(path, f"must be an integer or a string, not {_json_type(value)} {_shown(value)}"))
        return value
    expected = schema.get("type")
    actual = _json_type(value)
    if expected == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    if expected == "number" and actual == "integer":
        return value
    if expected is not None and actual != expected:
        errors.append(FieldError(path, f"must be of type {expected}, not {actual} {_shown(value)}"))
        return value
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return _finite(value, path, errors)
        properties: Mapping[str, Any] = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        result = {}
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key in properties:
                if item is not None:  # the server prunes a null field (none of ours is nullable)
                    result[key] = _conform(item, properties[key], where, errors)
            elif isinstance(extra, Mapping):
                result[key] = _conform(item, extra, where, errors)
            else:
                result[key] = item  # an unknown field: the models name it
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_conform(item, schema["items"], f"{path}[{index}]", errors) for index, item in enumerate(value)]
    return value


def _finite(value: Any, path: str, errors: list[FieldError]) -> Any:
    """Free-form values (``x-kubernetes-preserve-unknown-fields``) are any JSON, but JSON has no NaN."""
    if isinstance(value, dict):
        for key, item in value.items():
            _finite(item, f"{path}.{key}", errors)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _finite(item, f"{path}[{index}]", errors)
    elif isinstance(value, float) and not math.isfinite(value):
        errors.append(FieldError(path, f"{value} is not a number JSON can carry"))
    return value


@cache
def _user_schema() -> dict[str, Any]:
    """The CRD's schema of what a user writes: everything but status, which the server resets."""
    schema: dict[str, Any] = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    properties = {k: v for k, v in schema["properties"].items() if k != "status"}
    return {"type": "object", "properties": properties}


def conform(document: dict[str, Any]) -> tuple[dict[str, Any], list[FieldError]]:
    """The document with the CRD's structural schema applied, and what the schema refuses."""
    errors: list[FieldError] = []
    user = {k: v for k, v in document.items() if k != "status"}
    conformed = _conform(user, _user_schema(), "", errors)
    if "status" in document:
        conformed["status"] = document["status"]
    return conformed, errors


def _format_location(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def field_errors(error: ValidationError) -> list[FieldError]:
    """Pydantic's errors as field paths in the manifest's own (camelCase) names."""
    result = []
    for item in error.errors():
        location = tuple(part for part in item["loc"] if not str(part).startswith("function-"))
        reason = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            reason = "unknown field"
        elif item["type"] == "missing":
            reason = "required field is missing"
        path = _format_location(location)
        if reason.startswith(("spec.", "metadata.")):  # a cross-field rule names its own field
            path, _, reason = reason.partition(" ")
        elif reason.startswith("["):  # a list rule names the offending item: spec.env + [0].name
            suffix, _, reason = reason.partition(": ")
            path += suffix
        result.append(FieldError(path, reason))
    return result


def parse_agent(document: Any, source: str = "<object>") -> EnterpriseAgent:
    """Validates one decoded document as an EnterpriseAgent."""
    if not isinstance(document, dict):
        raise ManifestError(source, [FieldError("", f"expected a mapping, got {type(document).__name__}")])
    document, errors = conform(document)
    if errors:
        raise ManifestError(source, errors)
    try:
        return EnterpriseAgent.model_validate(document)
    except ValidationError as error:
        raise ManifestError(source, field_errors(error)) from None


def load_agents(text: str, source: str = "<stdin>") -> list[EnterpriseAgent]:
    """Every EnterpriseAgent in a (multi-document) YAML text. Empty documents are skipped."""
    if len(text.encode()) > MAX_MANIFEST_BYTES:
        raise ManifestError(source, [FieldError("", f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")])
    try:
        documents = [d for d in yaml.load_all(text, Loader=_KubectlLoader) if d is not None]
    except yaml.YAMLError as error:
        raise ManifestError(source, [FieldError("", f"not valid YAML: {error}")]) from None
    if not documents:
        raise ManifestError(source, [FieldError("", "no EnterpriseAgent found")])
    agents = []
    for index, document in enumerate(documents):
        where = source if len(documents) == 1 else f"{source} (document {index + 1})"
        agents.append(parse_agent(document, where))
    return agents


# Strings that a YAML 1.2 reader (kubectl, Argo CD, Flux: all Go) would take for a number, though
# PyYAML's YAML 1.1 resolver does not: a revision hash such as "1e10234567" must stay a string.
_NUMBER_LIKE = re.compile(
    r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^0[xo][0-9a-fA-F]+$|^[-+]?\.(inf|Inf|INF|nan|NaN|NAN)$"
)


class _KubernetesDumper(yaml.SafeDumper):
    """Quotes number-like strings and writes multi-line strings as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    if _NUMBER_LIKE.match(value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    return dumper.represent_str(value)


_KubernetesDumper.add_representer(str, _represent_str)


def dump_yaml_all(objects: Iterable[Any]) -> str:
    """Objects as a multi-document YAML stream that Go YAML readers read back unchanged."""
    return yaml.dump_all(objects, Dumper=_KubernetesDumper, sort_keys=False, default_flow_style=False)

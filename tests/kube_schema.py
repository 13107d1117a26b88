"""What the API server does with a custom resource, emulated offline for unit tests: structural
defaulting, OpenAPI validation, strict unknown-field rejection, list-type checks and CEL rules.

Tests on the local control plane check the same manifests against the real API server; this lets
the pure unit tests cover every bad manifest without one.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from typing import Any

import celpy
import jsonschema
from celpy.adapter import json_to_cel

from agent_operator.crd import build_crd

Schema = dict[str, Any]


@cache
def crd_schema() -> Schema:
    schema: Schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def apply_defaults(obj: Any, schema: Schema) -> Any:
    """Structural defaulting: a missing property with a default gets it, recursively."""
    if isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                obj[name] = apply_defaults(obj[name], sub)
        if isinstance(schema.get("additionalProperties"), dict):
            for key in obj:
                obj[key] = apply_defaults(obj[key], schema["additionalProperties"])
    elif isinstance(obj, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in obj]
    return obj


def _as_json_schema(schema: Schema) -> Schema:
    """OpenAPI v3.0 as JSON Schema draft 4 (whose exclusiveMinimum is also a boolean)."""
    result = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if schema.get("x-kubernetes-int-or-string"):
        result["type"] = ["integer", "string"]
    if "properties" in schema:
        result["properties"] = {k: _as_json_schema(v) for k, v in schema["properties"].items()}
    if isinstance(schema.get("additionalProperties"), dict):
        result["additionalProperties"] = _as_json_schema(schema["additionalProperties"])
    if "items" in schema:
        result["items"] = _as_json_schema(schema["items"])
    return result


def _path(parts: list[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _structural_errors(obj: Any, schema: Schema, path: list[Any]) -> list[str]:
    """Unknown fields (kubectl's default strict field validation) and list-type uniqueness."""
    errors: list[str] = []
    if isinstance(obj, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        properties = schema.get("properties")
        if properties is not None:
            errors += [f"{_path([*path, key])}: unknown field" for key in obj if key not in properties and path]
            for key, sub in properties.items():
                if key in obj:
                    errors += _structural_errors(obj[key], sub, [*path, key])
        elif isinstance(schema.get("additionalProperties"), dict):
            for key, value in obj.items():
                errors += _structural_errors(value, schema["additionalProperties"], [*path, key])
    elif isinstance(obj, list) and "items" in schema:
        if schema.get("x-kubernetes-list-type") == "set" and len({repr(v) for v in obj}) != len(obj):
            errors.append(f"{_path(path)}: duplicate entries in a set list")
        for index, item in enumerate(obj):
            errors += _structural_errors(item, schema["items"], [*path, index])
    return errors


_CEL_ENV = celpy.Environment()


@cache
def _cel_program(rule: str) -> Any:
    return _CEL_ENV.program(_CEL_ENV.compile(rule))


def cel_errors(obj: Any, schema: Schema, path: list[Any] | None = None) -> list[str]:
    """Evaluates every x-kubernetes-validations rule against the (defaulted) object."""
    path = path or []
    errors: list[str] = []
    for rule in schema.get("x-kubernetes-validations", []):
        result = _cel_program(rule["rule"]).evaluate({"self": json_to_cel(obj)})
        if isinstance(result, Exception) or not bool(result):
            where = _path(path) + rule.get("fieldPath", "")
            errors.append(f"{where}: {rule['message']}")
    if isinstance(obj, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in obj:
                errors += cel_errors(obj[key], sub, [*path, key])
        if isinstance(schema.get("additionalProperties"), dict):
            for key, value in obj.items():
                errors += cel_errors(value, schema["additionalProperties"], [*path, key])
    elif isinstance(obj, list) and "items" in schema:
        for index, item in enumerate(obj):
            errors += cel_errors(item, schema["items"], [*path, index])
    return errors


def _schema_error(error: jsonschema.ValidationError) -> str:
    path = list(error.absolute_path)
    if error.validator == "required":  # the API server reports the missing field itself
        missing = re.match(r"'(.+)' is a required property", error.message)
        if missing:
            return f"{_path([*path, missing.group(1)])}: Required value"
    return f"{_path(path)}: {error.message}"


def api_errors(document: dict[str, Any]) -> list[str]:
    """The errors the API server would give for this EnterpriseAgent; empty when it accepts it."""
    schema = crd_schema()
    obj = apply_defaults(copy.deepcopy(document), schema)
    validator = jsonschema.Draft4Validator(_as_json_schema(schema))
    errors = [_schema_error(e) for e in validator.iter_errors(obj)]
    errors += _structural_errors(obj, schema, [])
    if errors:
        return errors
    return cel_errors(obj, schema)

"""Generates the EnterpriseAgent CustomResourceDefinition from the pydantic models in ``spec.py``.

Pydantic emits JSON Schema 2020-12; a CRD needs a *structural* OpenAPI v3 schema. The conversion
inlines ``$ref``s, folds ``Optional`` into plain optional properties, turns ``int | str`` into
``x-kubernetes-int-or-string``, rewrites key patterns of maps into CEL rules, and materialises
``default_factory`` defaults so that the API server applies the same defaults pydantic does.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from agent_operator import spec

# Keywords a structural CRD schema may carry; anything else pydantic emits is dropped.
_ALLOWED_KEYWORDS = {
    "type", "description", "properties", "items", "additionalProperties", "required", "enum",
    "default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "pattern", "minItems", "maxItems", "minProperties", "maxProperties", "format", "nullable",
    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-validations",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
}  # fmt: skip


class _DefaultsIncluded(GenerateJsonSchema):
    """Emits defaults of ``default_factory`` fields too, encoded as the API sees them (camelCase)."""

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        if "default_factory" in schema and not schema.get("default_factory_takes_data"):
            factory = schema["default_factory"]
            inner = self.generate_inner(schema["schema"])
            value = factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                encoded: Any = value.model_dump(mode="json", by_alias=True, exclude_none=True)
            else:
                encoded = json.loads(json.dumps(value, default=str))
            return {**inner, "default": encoded}
        return super().default_schema(schema)


def _to_structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**_to_structural(target, defs), **node}
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b != {"type": "null"}]
        types = {b.get("type") for b in branches}
        if len(branches) == 1:
            node = {**_to_structural(branches[0], defs), **node}
        elif types == {"integer", "string"}:
            node["x-kubernetes-int-or-string"] = True
        else:
            raise ValueError(f"cannot express union {branches} in a structural schema")
    if node.get("default", ...) is None or node.get("default") in ([], {}):
        node.pop("default")
    if node.get("x-kubernetes-preserve-unknown-fields"):
        node.pop("additionalProperties", None)
        node.setdefault("type", "object")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, strict in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            node[strict] = node[bound]
            node[bound] = True
    if "properties" in node:
        node["properties"] = {k: _to_structural(v, defs) for k, v in node["properties"].items()}
        node.pop("additionalProperties", None)  # unknown fields are pruned, and strict clients reject them
    # Maps with constrained keys: the value schema becomes additionalProperties, the key
    # constraints a CEL rule (structural schemas have no patternProperties or propertyNames).
    key_rules = dict(node.pop("propertyNames", {}))
    if "patternProperties" in node:
        ((key_pattern, value_schema),) = node.pop("patternProperties").items()
        key_rules["pattern"] = key_pattern
        node["additionalProperties"] = value_schema
    if key_rules:
        checks, wording = [], []
        if "pattern" in key_rules:
            checks.append(f"k.matches({json.dumps(key_rules['pattern'])})")
            wording.append(f"match {key_rules['pattern']}")
        if "maxLength" in key_rules:
            checks.append(f"k.size() <= {key_rules['maxLength']}")
            wording.append(f"be at most {key_rules['maxLength']} characters")
        key_rule = {"rule": f"self.all(k, {' && '.join(checks)})", "message": "every key must " + " and ".join(wording)}
        node["x-kubernetes-validations"] = [key_rule, *node.get("x-kubernetes-validations", [])]
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _to_structural(node["additionalProperties"], defs)
    elif node.get("additionalProperties") is True:
        node.pop("additionalProperties")
    if "items" in node:
        node["items"] = _to_structural(node["items"], defs)
    return {k: v for k, v in node.items() if k in _ALLOWED_KEYWORDS}


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model, as a CRD version embeds it."""
    raw = model.model_json_schema(by_alias=True, schema_generator=_DefaultsIncluded, mode="validation")
    defs = raw.pop("$defs", {})
    return _to_structural(raw, defs)


_NAME_RULES = [
    {
        "rule": f"self.metadata.name.size() <= {spec.AGENT_NAME_MAX_LENGTH}",
        "message": f"metadata.name must be at most {spec.AGENT_NAME_MAX_LENGTH} characters"
        " (it prefixes Service and Deployment names)",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": f"self.metadata.name.matches({json.dumps(spec.AGENT_NAME_PATTERN)})",
        "message": "metadata.name must be a DNS-1035 label: lower-case letters, digits and '-', starting with a letter",
        "reason": "FieldValueInvalid",
    },
]

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Summary of the agent's state."},
    {"name": "Active", "type": "string", "jsonPath": ".status.activeColor", "description": "Colour serving traffic."},
    {
        "name": "Ready",
        "type": "integer",
        "jsonPath": ".status.readyReplicas",
        "description": "Ready pods of the active colour.",
    },
    {"name": "Image", "type": "string", "jsonPath": ".spec.image", "description": "Desired image."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    """The EnterpriseAgent CustomResourceDefinition."""
    schema: dict[str, Any] = {
        "type": "object",
        "description": "EnterpriseAgent runs an AI agent with security, compliance, observability and blue-green rollouts.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": openapi_schema(spec.EnterpriseAgentSpec),
            "status": openapi_schema(spec.EnterpriseAgentStatus),
        },
        "x-kubernetes-validations": copy.deepcopy(_NAME_RULES),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{spec.PLURAL}.{spec.GROUP}",
            "labels": {
                "app.kubernetes.io/name": "enterprise-agent-operator",
                "app.kubernetes.io/part-of": "enterprise-agent-operator",
            },
        },
        "spec": {
            "group": spec.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": spec.KIND,
                "listKind": f"{spec.KIND}List",
                "plural": spec.PLURAL,
                "singular": spec.SINGULAR,
                "shortNames": list(spec.SHORT_NAMES),
                "categories": ["all", "agents"],
            },
            "versions": [
                {
                    "name": spec.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }

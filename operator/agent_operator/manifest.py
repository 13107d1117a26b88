"""Reading EnterpriseAgent manifests from YAML, with errors that name the field."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

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
    try:
        return EnterpriseAgent.model_validate(document)
    except ValidationError as error:
        raise ManifestError(source, field_errors(error)) from None


def load_agents(text: str, source: str = "<stdin>") -> list[EnterpriseAgent]:
    """Every EnterpriseAgent in a (multi-document) YAML text. Empty documents are skipped."""
    if len(text.encode()) > MAX_MANIFEST_BYTES:
        raise ManifestError(source, [FieldError("", f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")])
    try:
        documents = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
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

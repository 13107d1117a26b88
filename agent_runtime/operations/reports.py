"""generate_report: a Markdown and HTML document built from an analysis of the given data,
stored in the embedded store and downloadable by id from /v1/reports/{id}."""

from __future__ import annotations

import html
import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from agent_runtime.operations.analyze import AnalyzeInput, analyze


class ReportInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Read only by build_report, in a worker process: a large body's analysis stays pickled on
    # the server's side (see operation_routes.parsed_body), never unpickled on its event loop.
    WORKER_FIELDS: ClassVar[tuple[str, ...]] = ("analysis",)

    title: str = Field(min_length=1, max_length=200)
    analysis: AnalyzeInput
    # The GDPR data subject the report is about, if any: GDPR export and erasure then include it.
    subject: str | None = Field(default=None, min_length=1, max_length=128)


def _number(value: float) -> str:
    return f"{value:.4g}"


# What could open raw HTML, a link or image, emphasis, code or a table cell in CommonMark/GFM
# (backslash-escaped, which CommonMark defines for any ASCII punctuation).
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_~\[\]<>!|&#])")
_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")


def markdown_text(text: str) -> str:
    """``text`` as literal Markdown text on one line: a title or column name from the caller can
    neither start a block nor inject HTML or a link."""
    return _MARKDOWN_SYNTAX.sub(r"\\\1", _LINE_BREAKS.sub(" ", text))


def render_markdown(title: str, analysis: dict[str, Any]) -> str:
    lines = [
        f"# {markdown_text(title)}",
        "",
        f"{analysis['rows']} rows, {len(analysis['columns'])} numeric columns.",
        "",
    ]
    if analysis["columns"]:
        lines += ["| column | count | mean | std | min | p50 | max | outliers |", "|---|---|---|---|---|---|---|---|"]
        for name, stats in analysis["columns"].items():
            q = stats["quantiles"]
            outliers = len(analysis["outliers"].get(name, []))
            lines.append(
                f"| {markdown_text(name)} | {stats['count']} | {_number(stats['mean'])} | {_number(stats['std'])} | {_number(stats['min'])}"
                f" | {_number(q['p50'])} | {_number(stats['max'])} | {outliers} |"
            )
        lines.append("")
    if analysis["correlation"]:
        lines += ["## Correlation", ""]
        lines += [
            f"- {markdown_text(pair.replace('~', ' and '))}: {_number(value)}"
            for pair, value in analysis["correlation"].items()
        ]
    return "\n".join(lines) + "\n"


def render_html(title: str, analysis: dict[str, Any]) -> str:
    escape = html.escape
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{stats['count']}</td><td>{_number(stats['mean'])}</td><td>{_number(stats['std'])}</td>"
        f"<td>{_number(stats['min'])}</td><td>{_number(stats['quantiles']['p50'])}</td><td>{_number(stats['max'])}</td></tr>"
        for name, stats in analysis["columns"].items()
    )
    correlations = "".join(
        f"<li>{escape(pair.replace('~', ' and '))}: {_number(value)}</li>"
        for pair, value in analysis["correlation"].items()
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)}</title></head><body>'
        f"<h1>{escape(title)}</h1><p>{analysis['rows']} rows</p>"
        f"<table><thead><tr><th>column</th><th>count</th><th>mean</th><th>std</th><th>min</th><th>p50</th><th>max</th></tr></thead>"
        f"<tbody>{rows}</tbody></table><h2>Correlation</h2><ul>{correlations}</ul></body></html>"
    )


def build_report(request: ReportInput) -> tuple[str, str]:
    """(markdown, html) of the analysis of ``request.analysis``."""
    analysis = analyze(request.analysis)
    return render_markdown(request.title, analysis), render_html(request.title, analysis)

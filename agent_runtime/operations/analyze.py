"""analyze_data: descriptive statistics, quartiles, correlation and outliers over the numeric
columns of JSON records or CSV text. Pure standard library (statistics), exact and typed."""

from __future__ import annotations

import csv
import io
import math
import statistics
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent_runtime.operations.base import InputError

MAX_ROWS = 100_000
MAX_COLUMNS = 200


class AnalyzeInput(BaseModel):
    """Either ``data`` (a list of records) or ``csv`` (text with a header row)."""

    model_config = ConfigDict(extra="forbid")

    data: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_ROWS)
    csv: str | None = Field(default=None, max_length=20_000_000)
    columns: list[str] | None = Field(
        default=None, max_length=MAX_COLUMNS, description="Numeric columns to analyse (default: all)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> AnalyzeInput:
        if (self.data is None) == (self.csv is None):
            raise ValueError("give exactly one of data or csv")
        return self


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _records(request: AnalyzeInput) -> list[dict[str, Any]]:
    if request.data is not None:
        return request.data
    reader = csv.DictReader(io.StringIO(request.csv or ""))
    rows = []
    for index, row in enumerate(reader):
        if index >= MAX_ROWS:
            raise ValueError(f"csv: more than {MAX_ROWS} rows")
        rows.append(row)
    return rows


def _numeric_columns(records: list[dict[str, Any]], wanted: list[str] | None) -> dict[str, list[tuple[int, float]]]:
    names: list[str] = []
    for record in records:
        for name in record:
            if name not in names:
                names.append(name)
    if wanted is not None:
        missing = [name for name in wanted if name not in names]
        if missing:
            raise ValueError(f"columns: not in the data: {', '.join(missing)}")
        names = wanted
    columns = {}
    for name in names[:MAX_COLUMNS]:
        values = [
            (row, number) for row, record in enumerate(records) if (number := _number(record.get(name))) is not None
        ]
        if values:
            columns[name] = values
    return columns


def describe(values: list[float]) -> dict[str, Any]:
    count = len(values)
    summary: dict[str, Any] = {"count": count, "mean": statistics.fmean(values), "min": min(values), "max": max(values)}
    summary["std"] = statistics.stdev(values) if count > 1 else 0.0
    if count > 1:
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
        p5, p95 = (statistics.quantiles(values, n=20, method="inclusive")[i] for i in (0, 18))
    else:
        q1 = median = q3 = p5 = p95 = values[0]
    summary["quantiles"] = {"p5": p5, "p25": q1, "p50": median, "p75": q3, "p95": p95}
    return summary


def analyze(request: AnalyzeInput) -> dict[str, Any]:
    records = _records(request)
    columns = _numeric_columns(records, request.columns)
    result: dict[str, Any] = {"rows": len(records), "columns": {}, "correlation": {}, "outliers": {}}
    for name, pairs in columns.items():
        values = [value for _, value in pairs]
        summary = describe(values)
        result["columns"][name] = summary
        low = summary["quantiles"]["p25"] - 1.5 * (summary["quantiles"]["p75"] - summary["quantiles"]["p25"])
        high = summary["quantiles"]["p75"] + 1.5 * (summary["quantiles"]["p75"] - summary["quantiles"]["p25"])
        result["outliers"][name] = [{"row": row, "value": value} for row, value in pairs if value < low or value > high]
    names = list(columns)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            by_row = dict(columns[second])
            paired = [(value, by_row[row]) for row, value in columns[first] if row in by_row]
            xs, ys = [a for a, _ in paired], [b for _, b in paired]
            if len(paired) > 1 and statistics.pstdev(xs) > 0 and statistics.pstdev(ys) > 0:
                result["correlation"][f"{first}~{second}"] = statistics.correlation(xs, ys)
    return result


async def analyze_data(request: AnalyzeInput) -> dict[str, Any]:
    try:
        return analyze(request)
    except (ValueError, ArithmeticError, csv.Error) as error:  # unknown columns, too many rows, overflow
        raise InputError(str(error)) from None

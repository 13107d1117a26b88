"""analyze_data: descriptive statistics, quartiles, correlation and outliers over the numeric
columns of JSON records or CSV text. Standard library only, typed, and linear in the input: one
pass over the cells, one sort per column (for the quantiles), and correlation over a bounded
number of columns."""

from __future__ import annotations

import csv
import io
import math
import operator
import statistics
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent_runtime.operations.base import InputError

MAX_ROWS = 100_000
MAX_COLUMNS = 200
MAX_CORRELATED = 20  # correlation covers the first 20 numeric columns: 190 pairs


class AnalyzeInput(BaseModel):
    """Either ``data`` (a list of records) or ``csv`` (text with a header row)."""

    model_config = ConfigDict(extra="forbid")

    data: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_ROWS)
    csv: str | None = Field(default=None, max_length=20_000_000)
    columns: list[str] | None = Field(
        default=None,
        max_length=MAX_COLUMNS,
        description=f"Numeric columns to analyse (default: the first {MAX_COLUMNS}); correlation covers the first {MAX_CORRELATED}.",
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
        text = value.strip()
        if not text:  # an empty cell, the commonest non-number: no exception to raise and catch
            return None
        try:
            number = float(text)
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


def _numeric_columns(records: list[dict[str, Any]], wanted: list[str] | None) -> dict[str, Column]:
    """The numeric values of each column, with their row numbers: one pass over the cells."""
    names: dict[str, None] = {}  # every column, in the order first seen
    for record in records:
        names.update(dict.fromkeys(record))
    if wanted is not None:
        missing = [name for name in wanted if name not in names]
        if missing:
            raise ValueError(f"columns: not in the data: {', '.join(missing)}")
        selected = list(dict.fromkeys(wanted))
    else:
        selected = list(names)[:MAX_COLUMNS]
    columns: dict[str, Column] = {name: Column() for name in selected}
    for row, record in enumerate(records):
        for name, value in record.items():
            column = columns.get(name)
            if column is not None and (number := _number(value)) is not None:
                column.rows.append(row)
                column.values.append(number)
    return {name: column for name, column in columns.items() if column.values}


class Column:
    """One column's numbers and the rows they are on (ascending)."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.values: list[float] = []


def _cut_points(ordered: list[float], n: int) -> list[float]:
    """statistics.quantiles(data, n=n, method="inclusive") of data already sorted (the same
    arithmetic, so the same numbers), to sort once for all quantiles."""
    m = len(ordered) - 1
    points = []
    for i in range(1, n):
        j, delta = divmod(i * m, n)
        points.append((ordered[j] * (n - delta) + ordered[j + 1] * delta) / n)
    return points


def _sample_std(values: list[float], mean: float) -> float:
    """The corrected two-pass formula (Chan, Golub and LeVeque): the second term takes out the
    rounding error of the mean, so large offsets with small spreads stay exact."""
    deviations = [value - mean for value in values]
    squares = math.fsum(map(operator.mul, deviations, deviations))
    total = math.fsum(deviations)
    std = math.sqrt(max(squares - total * total / len(values), 0.0) / (len(values) - 1))
    return std if math.isfinite(std) else statistics.stdev(values)  # beyond 1e154: exact arithmetic


def describe(values: list[float]) -> dict[str, Any]:
    count = len(values)
    mean = math.fsum(values) / count  # what statistics.fmean computes
    summary: dict[str, Any] = {"count": count, "mean": mean, "min": min(values), "max": max(values)}
    summary["std"] = _sample_std(values, mean) if count > 1 else 0.0
    if count > 1:
        ordered = sorted(values)
        q1, median, q3 = _cut_points(ordered, 4)
        twentieths = _cut_points(ordered, 20)
        p5, p95 = twentieths[0], twentieths[18]
    else:
        q1 = median = q3 = p5 = p95 = values[0]
    summary["quantiles"] = {"p5": p5, "p25": q1, "p50": median, "p75": q3, "p95": p95}
    return summary


class _Centred:
    """What Pearson's r needs of one series: its deviations from its mean and their sum of squares
    (statistics.correlation's arithmetic, Python 3.11), or nothing for a constant series."""

    def __init__(self, values: list[float]) -> None:
        self.constant = len(values) < 2 or min(values) == max(values)
        mean = math.fsum(values) / len(values) if values else 0.0
        self.deviations = [value - mean for value in values]
        self.squares = math.fsum(map(operator.mul, self.deviations, self.deviations))


def _pearson(x: _Centred, y: _Centred) -> float | None:
    if x.constant or y.constant:
        return None
    denominator = math.sqrt(x.squares * y.squares)
    if not (denominator > 0 and math.isfinite(denominator)):  # under- or overflow: no r to give
        return None
    return math.fsum(map(operator.mul, x.deviations, y.deviations)) / denominator


def correlations(columns: dict[str, Column]) -> dict[str, float]:
    """Pearson's r of each pair among the first MAX_CORRELATED columns, over the rows where both
    have a number. k columns make k(k-1)/2 pairs, so k is bounded: the work is at most
    MAX_CORRELATED / 2 passes over the cells, whatever the number of columns."""
    names = list(columns)[:MAX_CORRELATED]
    centred = {name: _Centred(columns[name].values) for name in names}
    by_row: dict[str, dict[int, float]] = {}
    found: dict[str, float] = {}
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = columns[first], columns[second]
            if a.rows == b.rows:  # the same rows (a complete table): each column's own deviations
                r = _pearson(centred[first], centred[second])
            else:
                if second not in by_row:
                    by_row[second] = dict(zip(b.rows, b.values, strict=True))
                other = by_row[second]
                paired = [(value, other[row]) for row, value in zip(a.rows, a.values, strict=True) if row in other]
                r = _pearson(_Centred([x for x, _ in paired]), _Centred([y for _, y in paired]))
            if r is not None:
                found[f"{first}~{second}"] = r
    return found


def analyze(request: AnalyzeInput) -> dict[str, Any]:
    records = _records(request)
    columns = _numeric_columns(records, request.columns)
    result: dict[str, Any] = {"rows": len(records), "columns": {}, "correlation": {}, "outliers": {}}
    for name, column in columns.items():
        summary = describe(column.values)
        result["columns"][name] = summary
        q1, q3 = summary["quantiles"]["p25"], summary["quantiles"]["p75"]
        low, high = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
        result["outliers"][name] = [
            {"row": row, "value": value}
            for row, value in zip(column.rows, column.values, strict=True)
            if value < low or value > high
        ]
    result["correlation"] = correlations(columns)
    return result


async def analyze_data(request: AnalyzeInput) -> dict[str, Any]:
    try:
        return analyze(request)
    except (ValueError, ArithmeticError, csv.Error) as error:  # unknown columns, too many rows, overflow
        raise InputError(str(error)) from None

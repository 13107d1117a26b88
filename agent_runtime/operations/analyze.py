"""analyze_data: descriptive statistics, quantiles, correlation and outliers over the numeric
columns of JSON records or CSV text.

The statistics are computed by agent_runtime.operations.tabular (numpy, and pandas' C reader for
CSV), which only the CPU workers import: this module is the input and the entry points."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent_runtime.operations.base import InputError

MAX_ROWS = 100_000
MAX_COLUMNS = 200
MAX_CORRELATED = 20  # correlation covers the first 20 numeric columns: 190 pairs
MAX_CSV_CHARACTERS = 20_000_000
# What the CPU workers' fork server imports before its first fork (operation_routes.worker_pool).
WORKER_PRELOAD = ("agent_runtime.operations.tabular",)


class AnalyzeInput(BaseModel):
    """Either ``data`` (a list of records) or ``csv`` (text with a header row)."""

    model_config = ConfigDict(extra="forbid")

    data: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_ROWS)
    csv: str | None = Field(default=None, max_length=MAX_CSV_CHARACTERS)
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


def analyze(request: AnalyzeInput) -> dict[str, Any]:
    """The statistics of the input (ValueError naming the field when it cannot be analysed)."""
    from agent_runtime.operations import tabular

    return tabular.analyze(request)


async def analyze_data(request: AnalyzeInput) -> dict[str, Any]:
    try:
        return analyze(request)
    except (ValueError, ArithmeticError) as error:  # unknown columns, too many rows, unparsable CSV
        raise InputError(str(error)) from None

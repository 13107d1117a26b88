"""analyze_data against numbers computed independently here (plain formulas, no statistics module),
in time linear in the cells."""

from __future__ import annotations

import math
import random
import time
from fractions import Fraction
from typing import Any

import pytest

from agent_runtime.operations.analyze import MAX_CORRELATED, AnalyzeInput, analyze
from tests.runtime.conftest import AppFactory, login


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def sample_std(xs: list[float]) -> float:
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, 'inclusive')."""
    ordered = sorted(xs)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def pearson(xs: list[float], ys: list[float]) -> float:
    mx, my = mean(xs), mean(ys)
    covariance = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return covariance / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))


def test_matches_independent_computation() -> None:
    rng = random.Random(42)
    xs = [rng.gauss(50, 10) for _ in range(500)]
    ys = [2 * x + rng.gauss(0, 5) for x in xs]
    xs[17] = 500.0  # an outlier
    data = [{"x": x, "y": y, "label": f"r{i}"} for i, (x, y) in enumerate(zip(xs, ys, strict=True))]
    result = analyze(AnalyzeInput(data=data))

    x = result["columns"]["x"]
    assert result["rows"] == 500
    assert set(result["columns"]) == {"x", "y"}  # the text column is not numeric
    assert x["count"] == 500
    assert x["mean"] == pytest.approx(mean(xs), rel=1e-12)
    assert x["std"] == pytest.approx(sample_std(xs), rel=1e-12)
    assert (x["min"], x["max"]) == (min(xs), max(xs))
    for name, q in (("p5", 0.05), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p95", 0.95)):
        assert x["quantiles"][name] == pytest.approx(quantile(xs, q), rel=1e-12), name
    assert result["correlation"]["x~y"] == pytest.approx(pearson(xs, ys), rel=1e-12)
    iqr = quantile(xs, 0.75) - quantile(xs, 0.25)
    expected = [i for i, v in enumerate(xs) if v < quantile(xs, 0.25) - 1.5 * iqr or v > quantile(xs, 0.75) + 1.5 * iqr]
    assert [o["row"] for o in result["outliers"]["x"]] == expected
    assert 17 in expected


def test_csv_input_and_missing_values() -> None:
    text = "a,b\n1,10\n2,\n3,30\nx,40\n"
    result = analyze(AnalyzeInput(csv=text))
    assert result["columns"]["a"]["count"] == 3  # "x" is not a number
    assert result["columns"]["b"]["count"] == 3  # the empty cell is skipped
    assert result["columns"]["a"]["mean"] == 2
    assert result["correlation"]["a~b"] == pytest.approx(1.0)  # rows 0 and 2 pair up


async def test_over_http_with_typed_input_errors(make_client: AppFactory) -> None:
    client = await make_client(extra_operations={})
    token = (await login(client, "ana"))["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    ok = await client.post(
        "/v1/operations/analyze_data", json={"input": {"data": [{"v": 1}, {"v": 3}]}}, headers=headers
    )
    body: dict[str, Any] = await ok.json()
    assert ok.status == 200, body
    assert body["result"]["columns"]["v"]["mean"] == 2
    for bad, field in (
        ({}, "give exactly one of data or csv"),
        ({"data": "nope"}, "input.data"),
        ({"csv": "a\n1", "extra": 1}, "input.extra"),
    ):
        response = await client.post("/v1/operations/analyze_data", json={"input": bad}, headers=headers)
        answer = await response.json()
        assert response.status == 422, answer
        assert answer["code"] == "invalid_input"
        assert field in answer["message"]


def test_correlation_covers_the_first_twenty_columns_and_statistics_all_of_them() -> None:
    rng = random.Random(7)
    names = [f"c{i:02d}" for i in range(25)]
    rows = [{name: rng.gauss(0, 1) + (i if name == "c03" else 0) for name in names} for i in range(60)]
    for row in rows[1::7]:
        del row["c05"]  # gaps: a pair is correlated over the rows where both have a number
    result = analyze(AnalyzeInput(data=rows))
    assert set(result["columns"]) == set(names)
    assert len(result["correlation"]) == MAX_CORRELATED * (MAX_CORRELATED - 1) // 2 == 190
    assert {pair.split("~")[1] for pair in result["correlation"]} <= set(names[:MAX_CORRELATED])
    for pair in ("c00~c03", "c03~c05", "c05~c19"):
        first, second = pair.split("~")
        both = [row for row in rows if first in row and second in row]
        expected = pearson([row[first] for row in both], [row[second] for row in both])
        assert result["correlation"][pair] == pytest.approx(expected, rel=1e-12), pair


def test_a_large_offset_with_a_small_spread_keeps_its_std_exact() -> None:
    """1e12 plus a few thousandths: the mean cannot be held exactly in a float, and a plain
    two-pass formula pays for its rounding in the spread (0.1 % off here)."""
    values = [1e12 + step * 1e-3 for step in range(1, 8)] * 3
    exact = [Fraction(value) for value in values]
    mean_exact = sum(exact) / len(exact)
    variance = sum((value - mean_exact) ** 2 for value in exact) / (len(exact) - 1)
    std = analyze(AnalyzeInput(data=[{"v": value} for value in values]))["columns"]["v"]["std"]
    assert std == pytest.approx(math.sqrt(variance), rel=1e-12)


def test_numbers_too_small_to_square_are_described_not_refused() -> None:
    result = analyze(AnalyzeInput(data=[{"x": 1e-300 * i, "y": 2e-300 * i} for i in range(1, 6)]))
    assert result["columns"]["x"]["mean"] == pytest.approx(3e-300)
    assert result["correlation"] == {}  # their squares underflow: no r to give, and none made up


def _seconds(text: str) -> float:
    """The fastest of three runs: the least disturbed by whatever else the machine is doing."""
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        analyze(AnalyzeInput(csv=text))
        runs.append(time.perf_counter() - started)
    return min(runs)


def test_four_times_the_columns_take_at_most_about_four_times_as_long() -> None:
    """Linear in the cells: the correlation pairs, quadratic in the columns, are bounded (190). The
    code this replaces correlated every pair: 16 times the pairs for 4 times the columns."""
    rng = random.Random(3)

    def table(columns: int) -> str:
        lines = [",".join(f"c{i}" for i in range(columns))]
        lines += [",".join(str(rng.randint(0, 9)) for _ in range(columns)) for _ in range(400)]
        return "\n".join(lines)

    narrow, wide = _seconds(table(50)), _seconds(table(200))
    assert wide / narrow < 8, f"{wide:.3f}s for 200 columns, {narrow:.3f}s for 50"

"""analyze_data against numbers computed independently here (plain formulas, no statistics module),
in time linear in the cells."""

from __future__ import annotations

import csv
import io
import math
import random
import re
import statistics
import subprocess
import sys
import time
from fractions import Fraction
from typing import Any

import pytest
from pydantic import ValidationError

from agent_runtime.operations import analyze as analyze_module
from agent_runtime.operations.analyze import (
    MAX_CORRELATED,
    MAX_CSV_CHARACTERS,
    MAX_ROWS,
    AnalyzeInput,
    analyze,
    analyze_data,
)
from agent_runtime.operations.base import InputError
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
        # Malformed CSV and unknown columns: 422s that name the field, never a 500.
        ({"csv": "a,b,a\n1,2,3\n"}, "csv: the header names a column more than once: a"),
        ({"csv": 'a,b\n"1,2\n'}, "csv: cannot be parsed"),
        ({"csv": "a\n" + "1\n" * (MAX_ROWS + 1)}, f"csv: more than {MAX_ROWS} rows"),
        ({"csv": "a,b\n1,2\n", "columns": ["c"]}, "columns: not in the data: c"),
        ({"data": [{"v": 1}], "columns": ["v", "w"]}, "columns: not in the data: w"),
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
    xs = [1e-300 * i for i in range(1, 6)]
    result = analyze(AnalyzeInput(data=[{"x": x, "y": 2 * x} for x in xs]))
    assert result["columns"]["x"]["mean"] == pytest.approx(3e-300)
    # Scaled by a power of two before squaring: the spread is not lost to underflow.
    assert result["columns"]["x"]["std"] == pytest.approx(statistics.stdev(xs), rel=1e-12, abs=0)
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


# --- a plain reference: the csv module, float() and the statistics module ---------------------------

# A CSV cell is a number when it is ASCII decimal notation (what pandas' C reader reads as one):
# float() without its extras ("1_000", non-ASCII digits and spaces), and finite.
DECIMAL = re.compile(r"[ \t]*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?[ \t]*", re.ASCII)


def reference_number(cell: str) -> float | None:
    if not DECIMAL.fullmatch(cell):
        return None
    value = float(cell)
    return value if math.isfinite(value) else None


def reference(text: str) -> dict[str, Any]:
    """analyze's answer for CSV text, computed the plain way: csv.reader, per-cell float(), the
    statistics module (fmean, exact stdev, quantiles "inclusive") and rational arithmetic (r)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    rows = [row for row in reader if row]  # blank lines are no rows
    numbers: dict[str, dict[int, float]] = {}
    for i, name in enumerate(header):
        cells = {r: reference_number(row[i]) for r, row in enumerate(rows) if i < len(row)}
        found = {r: v for r, v in cells.items() if v is not None}
        if found:
            numbers[name] = found
    result: dict[str, Any] = {"rows": len(rows), "columns": {}, "correlation": {}, "outliers": {}}
    for name, found in numbers.items():
        xs = list(found.values())
        if len(xs) > 1:
            quarters, twentieths = (statistics.quantiles(xs, n=n, method="inclusive") for n in (4, 20))
            cuts = [twentieths[0], *quarters, twentieths[18]]
        else:
            cuts = xs * 5
        q = dict(zip(("p5", "p25", "p50", "p75", "p95"), cuts, strict=True))
        result["columns"][name] = {
            "count": len(xs),
            "mean": statistics.fmean(xs),
            "min": min(xs),
            "max": max(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "quantiles": q,
        }
        iqr = q["p75"] - q["p25"]
        low, high = q["p25"] - 1.5 * iqr, q["p75"] + 1.5 * iqr
        result["outliers"][name] = [{"row": r, "value": v} for r, v in found.items() if v < low or v > high]
    names = list(numbers)[:MAX_CORRELATED]
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            both = sorted(numbers[first].keys() & numbers[second].keys())
            xs, ys = [numbers[first][r] for r in both], [numbers[second][r] for r in both]
            if len(set(xs)) > 1 and len(set(ys)) > 1:
                result["correlation"][f"{first}~{second}"] = exact_pearson(xs, ys)
    return result


def exact_pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson's r in rational arithmetic, rounded once at the end. Not statistics.correlation:
    Python 3.11's centres on rounded means, and a 1e12 offset costs it 3e-10 of r (measured here)."""
    fx, fy = [Fraction(x) for x in xs], [Fraction(y) for y in ys]
    mx, my = sum(fx) / len(fx), sum(fy) / len(fy)
    sxy = sum((x - mx) * (y - my) for x, y in zip(fx, fy, strict=True))
    squares = sum((x - mx) ** 2 for x in fx) * sum((y - my) ** 2 for y in fy)
    return math.copysign(math.sqrt(sxy * sxy / squares), sxy)


def assert_matches_reference(result: dict[str, Any], expected: dict[str, Any]) -> None:
    """Counts, min, max, quantiles (the same arithmetic) and means (fmean's correctly rounded sum)
    exactly; std and r within 1e-12 relative; outliers' rows and values exactly."""
    assert result["rows"] == expected["rows"]
    assert list(result["columns"]) == list(expected["columns"])
    for name, want in expected["columns"].items():
        got = result["columns"][name]
        assert set(got) == set(want), name
        for key in ("count", "mean", "min", "max", "quantiles"):
            assert got[key] == want[key], (name, key)
        assert got["std"] == pytest.approx(want["std"], rel=1e-12, abs=0), name
        assert result["outliers"][name] == expected["outliers"][name], name
    assert set(result["correlation"]) == set(expected["correlation"])
    for pair, r in expected["correlation"].items():
        assert result["correlation"][pair] == pytest.approx(r, rel=1e-12, abs=1e-15), pair


def mixed_csv(rows: int, seed: int) -> str:
    """Numbers among blanks, padded cells, text, NA words, bool-like words, quoted fields with
    commas and line breaks, exponents, infinities and integers beyond int64."""
    rng = random.Random(seed)
    amounts = ["", " 12.5 ", "x", "n/a", "NA", '"1,5"', "1e3", "-.5", "+7.", "inf", "-Infinity", "nan", "007"]
    lines = ["amount,score,flag,label,sparse,offset,big"]
    for _ in range(rows):
        amount = rng.choice(amounts) if rng.random() < 0.4 else f"{rng.gauss(100, 30):.6f}"
        score = rng.choice(["TRUE", "false", "-", "", "1.5E-3"]) if rng.random() < 0.2 else str(rng.randint(-50, 50))
        flag = rng.choice(["True", "False", ""])
        label = rng.choice(['"a, b"', '"line\nbreak"', "plain", '"say ""hi"""'])
        sparse = f"{rng.uniform(-1, 1):.17g}" if rng.random() < 0.3 else ""
        offset = f"{1e12 + rng.randint(0, 9999) * 1e-3!r}"
        big = rng.choice(["99999999999999999999", "-5", "12345678901234567890123", "3.25"])
        lines.append(",".join((amount, score, flag, label, sparse, offset, big)))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_csv_matches_a_plain_reference(seed: int) -> None:
    text = mixed_csv(400, seed)
    result = analyze(AnalyzeInput(csv=text))
    expected = reference(text)
    assert set(expected["columns"]) == {"amount", "score", "sparse", "offset", "big"}  # flag and label: none
    assert_matches_reference(result, expected)


def test_the_same_through_the_numeric_reader_and_the_text_path() -> None:
    """A column pandas reads as numbers and the same cells in a column it reads as text (one text
    cell) give the same numbers: both follow float(), correctly rounded."""
    rng = random.Random(11)
    cells = [f"{rng.uniform(-1e6, 1e6):.{rng.randint(1, 20)}g}" for _ in range(3000)]
    cells += [f"{rng.randint(1, 9)}.{rng.randint(0, 10**18)}e{rng.randint(-300, 300)}" for _ in range(3000)]
    infinite = ["inf", "-Infinity", "1e999", "nan"]  # numbers to the reader, none to analyze
    text = "numeric,textual\n" + "".join(f"{cell},{cell}\n" for cell in cells + infinite) + ",text\n"
    result = analyze(AnalyzeInput(csv=text))
    numeric, textual = result["columns"]["numeric"], result["columns"]["textual"]
    assert numeric == textual
    assert numeric["count"] == len(cells)
    assert numeric["mean"] == statistics.fmean(float(cell) for cell in cells)
    assert result["outliers"]["numeric"] == result["outliers"]["textual"]
    extremes = {item["value"] for item in result["outliers"]["numeric"]} | {numeric["min"], numeric["max"]}
    assert extremes <= {float(cell) for cell in cells}  # each value read is float()'s, exactly


def test_a_large_offset_keeps_its_mean_and_spread_exact_in_csv() -> None:
    rng = random.Random(5)
    values = [1e12 + rng.randint(-5000, 5000) * 1e-3 for _ in range(20_000)]
    result = analyze(AnalyzeInput(csv="v\n" + "".join(f"{v!r}\n" for v in values)))["columns"]["v"]
    exact = [Fraction(value) for value in values]
    mean = sum(exact) / len(exact)
    assert result["mean"] == statistics.fmean(values) == pytest.approx(float(mean), abs=math.ulp(1e12))
    variance = sum((value - mean) ** 2 for value in exact) / (len(exact) - 1)
    assert result["std"] == pytest.approx(math.sqrt(variance), rel=1e-12)


def test_extreme_magnitudes() -> None:
    # Cancellation beyond extended precision: math.fsum's exact sum, not zero.
    for cancelling in ([1e20, 1.0, -1e20, 2.0], [1e300, -1e300, 1e-300, 3.0]):
        got = analyze(AnalyzeInput(data=[{"v": v} for v in cancelling]))["columns"]["v"]
        assert got["mean"] == statistics.fmean(cancelling) == 0.75
    # Squares beyond a float's range: scaled by a power of two, the spread stays right.
    huge = [1e200, 2e200, 3e200, -7e250]
    got = analyze(AnalyzeInput(data=[{"v": v} for v in huge]))["columns"]["v"]
    assert got["std"] == pytest.approx(statistics.stdev(huge), rel=1e-12)
    assert got["mean"] == statistics.fmean(huge)
    # A sum beyond a float's range, whose mean is not: described (the math.fsum code refused it).
    top = [1.5e308, 1.7e308, 1.6e308]
    got = analyze(AnalyzeInput(data=[{"v": v} for v in top]))["columns"]["v"]
    assert got["mean"] == pytest.approx(1.6e308, rel=1e-15)
    assert got["quantiles"]["p50"] == 1.6e308
    assert got["std"] == pytest.approx(1e307, rel=1e-12)


async def test_a_spread_beyond_a_float_is_refused_with_a_422() -> None:
    with pytest.raises(InputError, match=r"^data: column 'v': a standard deviation is beyond a float's range$"):
        await analyze_data(AnalyzeInput(data=[{"v": -1.5e308}, {"v": 1.5e308}]))


def test_constant_columns_have_no_correlation() -> None:
    text = "c,x,y,z\n" + "".join(f"4.5,{i},{i * i if i % 3 else ''},{7 if i < 10 else i}\n" for i in range(20))
    result = analyze(AnalyzeInput(csv=text))
    c = result["columns"]["c"]
    assert (c["std"], c["min"], c["max"], c["mean"]) == (0.0, 4.5, 4.5, 4.5)
    assert set(c["quantiles"].values()) == {4.5}
    assert result["outliers"]["c"] == []
    assert not any("c" in pair.split("~") for pair in result["correlation"])
    assert_matches_reference(result, reference(text))


def test_pairs_over_different_missing_rows() -> None:
    """Each pair over the rows where both have a number, from those rows' own means; pairs whose
    columns miss the same rows, and pairs that meet on a single row or none."""
    rng = random.Random(9)
    lines = ["a,b,c,d,e,f,g,h"]
    for i in range(300):
        a = rng.gauss(0, 1)
        b = a + rng.gauss(0, 0.5) if i % 3 else ""
        c = -a + rng.gauss(0, 2) if i % 5 else ""
        d = rng.gauss(5, 1) if i % 3 else ""  # missing exactly where b is
        e = rng.gauss(0, 1) if i == 0 else ""  # a single number
        f = rng.gauss(0, 1) if i % 3 == 0 else ""  # only where b and d have none
        g = 1e12 + a + rng.gauss(0, 1) if i % 4 else ""  # large offsets, small spreads
        h = 1e12 + a if i % 7 else ""
        lines.append(",".join(str(v) for v in (a, b, c, d, e, f, g, h)))
    text = "\n".join(lines) + "\n"
    result = analyze(AnalyzeInput(csv=text))
    expected = reference(text)
    assert {"a~b", "a~c", "b~c", "b~d", "a~f", "c~f", "g~h"} <= set(expected["correlation"])
    assert not {"b~f", "d~f", "a~e"} & set(result["correlation"])
    assert_matches_reference(result, expected)


def test_csv_cells_are_decimal_notation() -> None:
    """What counts as a number in CSV: ASCII decimal notation, as pandas' C reader reads it.
    float() also reads "1_000", "\u0661\u0662" (Arabic-Indic 12) and non-ASCII spaces: text here. JSON
    records keep float()'s reading of their strings."""
    text = "a,b,c\n1_000,True,1\n\u0661\u0662,1,False\n\u00a01.5,,\n2,FALSE,\n"
    result = analyze(AnalyzeInput(csv=text))
    assert (result["columns"]["a"]["count"], result["columns"]["a"]["mean"]) == (1, 2.0)
    assert result["columns"]["b"]["count"] == 1  # "True" and "FALSE" are words, not 1 and 0
    assert result["columns"]["c"]["count"] == 1
    records = analyze(AnalyzeInput(data=[{"a": "1_000"}, {"a": True}, {"a": 10**400}, {"a": " 2 "}]))
    assert records["columns"]["a"]["count"] == 2  # bools are no numbers; 10**400 is beyond a float
    # pandas' reader takes a blank after the exponent mark of a signed number ("+1e 5") in a column
    # it reads as numbers; float() does not. Pinned, so that a change of pandas here is seen.
    assert analyze(AnalyzeInput(csv="a\n+1e 5\n2\n"))["columns"]["a"]["max"] == 1e5
    assert analyze(AnalyzeInput(csv="a\n1e 5\n2\n"))["columns"]["a"]["max"] == 2.0


def test_a_column_with_text_after_the_readers_first_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """pandas reads 262,144 rows at a time: a column with numbers in one chunk and text in a later
    one comes back as Python ints and strings mixed, which are read cell by cell."""
    monkeypatch.setattr(analyze_module, "MAX_ROWS", 300_000)
    rows = 280_000
    text = "a,b\n" + "".join(f"{i},{i % 7}\n" for i in range(rows)) + "x,1\n2.5,1\n"
    column = analyze(AnalyzeInput.model_construct(csv=text, data=None, columns=None))["columns"]["a"]
    assert column["count"] == rows + 1
    assert column["mean"] == statistics.fmean([*range(rows), 2.5])


def test_ascii_text_read_in_pieces_reads_as_the_whole_encoded_text() -> None:
    """ASCII CSV goes to pandas' reader a piece at a time (many pieces here: 1.5 MB); other text is
    encoded whole first. A column named in non-ASCII takes the second path: the other columns'
    figures are the same either way, quoted line breaks across pieces included."""
    rng = random.Random(7)
    rows = [f'{rng.gauss(0, 1)!r},"{rng.randrange(10**6)}\n{i}",{rng.randrange(100)}' for i in range(60_000)]
    body = "\n".join(rows) + "\n"
    assert len(body) > 1_000_000
    pieces = analyze(AnalyzeInput(csv="a,b,c\n" + body))
    whole = analyze(AnalyzeInput(csv="a,b,\u00e7\n" + body))
    assert pieces["rows"] == whole["rows"] == 60_000
    assert pieces["columns"]["a"] == whole["columns"]["a"]
    assert pieces["columns"]["c"] == whole["columns"]["\u00e7"]
    assert "b" not in pieces["columns"]  # a quoted field with a line break is text, not a number


def test_ragged_rows_and_header_corners() -> None:
    def columns(text: str, **options: Any) -> dict[str, tuple[int, float]]:
        result = analyze(AnalyzeInput(csv=text, **options))
        return {name: (figures["count"], figures["mean"]) for name, figures in result["columns"].items()}

    # A longer row's extra fields are ignored (the first row too: no index column inferred);
    # a shorter row's missing cells are blanks.
    assert columns("a,b\n1,2,3\n4,5\n6\n7,8,9,10\n") == {"a": (4, 4.5), "b": (3, 5.0)}
    assert analyze(AnalyzeInput(csv="a,b\n")) == {"rows": 0, "columns": {}, "correlation": {}, "outliers": {}}
    assert analyze(AnalyzeInput(csv="a,b", columns=["b"]))["columns"] == {}  # a header only: known names
    assert analyze(AnalyzeInput(csv=""))["rows"] == 0
    assert analyze(AnalyzeInput(csv="a\n\n1\n\n3\n"))["rows"] == 2  # blank lines are no rows
    # Unnamed columns, repeated (a spreadsheet's trailing separators): the last, as before.
    assert columns("a,,\n1,2,3\n4,5,6\n") == {"a": (2, 2.5), "": (2, 4.5)}
    assert columns('"a,1","b\nc"\n1,2\n') == {"a,1": (1, 1.0), "b\nc": (1, 2.0)}  # quoted names
    assert columns("a,b\n1\x002,3\n4,5\n") == {"a": (1, 4.0), "b": (2, 4.0)}  # a NUL is text
    assert columns("a,b,c\n1,2,3\n", columns=["c", "a", "c"]) == {"c": (1, 3.0), "a": (1, 1.0)}
    assert analyze(AnalyzeInput(csv="a,b\n1,2\n3,4\n", columns=[]))["rows"] == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b,a\n1,2,3\n", "csv: the header names a column more than once: a"),
        ("x,y,x,y\n", "csv: the header names a column more than once: x, y"),
        ('a,b\n"1,2\n3,4\n', "csv: cannot be parsed: Error tokenizing data. C error: EOF inside string"),
        ("a\n" + "1\n" * (MAX_ROWS + 1), f"csv: more than {MAX_ROWS} rows"),
        ("a\n" + "1\r" * (MAX_ROWS + 1), f"csv: more than {MAX_ROWS} rows"),
    ],
)
async def test_malformed_csv_is_an_input_error_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(InputError) as raised:
        await analyze_data(AnalyzeInput(csv=text))
    assert str(raised.value).startswith(message)


async def test_text_that_is_not_utf8_is_an_input_error() -> None:
    """A lone surrogate (a JSON escape) the model lets through when built without validation."""
    with pytest.raises(InputError, match="csv: not encodable as UTF-8"):
        await analyze_data(AnalyzeInput.model_construct(csv="a\n\ud800\n", data=None, columns=None))


def test_the_csv_length_cap() -> None:
    line = " " * 195 + "1.5\n"  # padded numbers: 100k rows of them fill the 20M characters
    text = "a\n" + line * (MAX_ROWS - 1)
    text += " " * (MAX_CSV_CHARACTERS - len(text) - 2) + "3\n"  # the last row, to the cap exactly
    assert len(text) == MAX_CSV_CHARACTERS
    result = analyze(AnalyzeInput(csv=text))
    assert result["rows"] == result["columns"]["a"]["count"] == MAX_ROWS
    assert result["columns"]["a"]["mean"] == statistics.fmean([1.5] * (MAX_ROWS - 1) + [3.0])
    with pytest.raises(ValidationError, match="csv"):
        AnalyzeInput(csv=text + "\n")


def test_the_server_process_never_imports_numpy_or_pandas() -> None:
    """numpy and pandas (about 50 MB) are imported where analyze_data runs, the CPU workers: the
    server process, which loads every operation's module and input model, stays without them."""
    code = (
        "import sys, agent_runtime.app, agent_runtime.cli, agent_runtime.report_routes;"
        "from agent_runtime.operations import analyze;"
        "analyze.AnalyzeInput.model_validate({'csv': 'a\\n1\\n'});"
        "print(sorted(name for name in ('numpy', 'pandas') if name in sys.modules))"
    )
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert printed.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "text", [",," * 50_000 + "\n1\n", '"x\n",' + "," * 50_000 + "\n1\n"], ids=["commas", "after-a-quoted-line-break"]
)
async def test_a_header_of_a_hundred_thousand_fields_is_refused_before_it_is_parsed(text: str) -> None:
    """A megabyte of commas would be a million pandas columns (a gigabyte): refused by its width,
    which a quoted line break in the first field does not hide."""
    with pytest.raises(InputError, match=r"^csv: the header has \d+ fields, more than 10000$"):
        await analyze_data(AnalyzeInput(csv=text))


async def test_commas_inside_a_quoted_header_field_are_not_fields() -> None:
    result = await analyze_data(AnalyzeInput(csv='"x\n' + "," * 50_000 + '"\n1\n'))
    assert result["rows"] == 1
    assert result["columns"]["x\n" + "," * 50_000]["count"] == 1

"""bench/operations: the CPU-bound built-in operations against a baseline measured in the same run.

- analyze_data on generated CSV (8 numeric columns; 1% of one column's cells blank), against pandas
  computing the same figures (read_csv; count, mean, std with ddof=1, min, max, the 5/25/50/75/95th
  percentiles with linear interpolation, the 1.5 IQR outliers, pairwise Pearson correlation). The
  results are compared figure by figure, every figure (outliers' rows and values included); a
  mismatch is printed, not hidden. pandas' DataFrame.corr loses precision on a column with a large
  offset, so a correlation where it and ours part is settled by numpy.corrcoef; each side's means
  are also measured against statistics.fmean. A last line per size gives ours/pandas against the
  target (issue 19: at most 1.5x).
- process_document on generated text (prose with e-mails, phones, dates, money, card numbers,
  SSNs, IP addresses, organisations, some health terms) at several sizes, in MB/s: constant MB/s
  means linear time. There is no honest library baseline for it (a bare `re` pass of the same
  patterns skips the work around them), so one str.split() pass over the text is printed as a floor:
  the least that reading the text once costs, not a competitor.

Ours runs as the server runs it, minus HTTP, authentication and audit: the JSON body (bytes) goes to
a worker of agent_runtime.workers.WorkerPool. analyze_data's is parsed, validated and run there in
one call (operation_routes.parsed_and_run: the server needs nothing of the body unless SOX holds the
operation for approval); process_document's is parsed and validated in one call (parsed_body) and
run in a second, as the server does when it checks the subject's consent under GDPR. Either way the
result is encoded to JSON in the worker (run_json). Each side runs in a process of its own (so they
share no peak), at the runtime workers' niceness (10); peak memory is the worker's VmHWM for ours
(plus the process that holds the body and the encoded answer, as the server does) and ru_maxrss for
pandas.

The limits are probed first and printed: an input over them (the HTTP body cap, the model's lengths,
analyze's row cap) is refused by the operation, so it is measured with those limits lifted, and the
table says so.

    .venv/bin/python -m bench.operations [--rows 100000 1000000] [--doc-sizes 100000 1000000 5000000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import math
import os
import pickle
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np

from agent_runtime.api import MAX_BODY_BYTES
from agent_runtime.operation_routes import parsed_and_run, parsed_body
from agent_runtime.operations import analyze as analyze_module
from agent_runtime.operations.analyze import AnalyzeInput, analyze_data
from agent_runtime.operations.base import InputError
from agent_runtime.operations.documents import MAX_CHARACTERS, DocumentInput, process_document
from agent_runtime.workers import WorkerPool, bulk, json_bytes

NICENESS = 10  # agent_runtime.workers._NICENESS: the baseline runs at the same priority
QUANTILES = {"p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}
REL_TOLERANCE = 1e-9
SEED = 19


# --- inputs -------------------------------------------------------------------------------------


def make_csv(rows: int, blank_share: float) -> bytes:
    """Eight numeric columns of different shapes: normal, heavy-tailed (outliers), uniform, integer,
    a large offset with a small spread (precision), exponential, correlated, Student's t."""
    rng = np.random.default_rng(SEED)
    a = rng.normal(100, 15, rows)
    columns = {
        "normal": (a, "%.4f"),
        "lognormal": (rng.lognormal(3, 1, rows), "%.4f"),
        "uniform": (rng.uniform(-1000, 1000, rows), "%.3f"),
        "integer": (rng.integers(0, 1000, rows).astype(float), "%.0f"),
        "offset": (1e9 + rng.normal(0, 1, rows), "%.4f"),
        "exponential": (rng.exponential(50, rows), "%.4f"),
        "correlated": (2 * a + rng.normal(0, 10, rows), "%.4f"),
        "student_t": (rng.standard_t(3, rows), "%.5f"),
    }
    text = [np.char.mod(fmt, values) for values, fmt in columns.values()]
    blanks = rng.random(rows) < blank_share
    text[-1] = np.where(blanks, "", text[-1])
    lines = [",".join(columns)]
    lines += [",".join(cells) for cells in zip(*(column.tolist() for column in text), strict=True)]
    return ("\n".join(lines) + "\n").encode()


PROSE = (
    "the quarterly review found that our team delivered the project on schedule while the budget "
    "remained under pressure from supplier costs and the customer asked for a revised proposal with "
    "clearer milestones before the board meeting next month and several open questions remain about "
    "scope staffing and the migration plan which we will discuss in the follow up"
)
WORDS = PROSE.split()
ORGS = ("Acme Corp", "Globex Inc", "Initech LLC", "Northwind Bank", "Contoso Ltd", "Umbrella Group", "Stark GmbH")
NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
MONTH_NAMES = ("January", "March", "June", "September", "Dec", "Oct")


def _card(rng: random.Random) -> str:
    digits = [4] + [rng.randrange(10) for _ in range(14)]
    total = sum(d if i % 2 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(reversed(digits)))
    digits.append((10 - total % 10) % 10)  # the Luhn check digit
    text = "".join(map(str, digits))
    return " ".join(text[i : i + 4] for i in range(0, 16, 4))


def make_text(size: int) -> str:
    """Deterministic prose, one item of personal data or an entity about every other sentence."""
    rng = random.Random(SEED)  # noqa: S311 - reproducible text, not a secret
    fillers: list[Callable[[], str]] = [
        lambda: (
            f"{rng.choice(NAMES)}.{rng.choice(NAMES)}{rng.randrange(100)}@example.{rng.choice(('com', 'org', 'co.uk'))}"
        ),
        lambda: f"+1 {rng.randrange(200, 999)} {rng.randrange(200, 999)} {rng.randrange(1000, 9999)}",
        lambda: f"({rng.randrange(20, 99)}) {rng.randrange(100, 999)}-{rng.randrange(1000, 9999)}",
        lambda: f"{rng.randrange(2000, 2030)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
        lambda: f"{rng.choice(MONTH_NAMES)} {rng.randrange(1, 29)}, {rng.randrange(1990, 2030)}",
        lambda: f"${rng.randrange(1, 999)},{rng.randrange(0, 999):03d}.{rng.randrange(0, 99):02d}",
        lambda: f"{rng.randrange(1, 99)},{rng.randrange(0, 999):03d} EUR",
        lambda: _card(rng),
        lambda: f"{rng.randrange(100, 899)}-{rng.randrange(10, 99)}-{rng.randrange(1000, 9999)}",
        lambda: f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
        lambda: rng.choice(ORGS),
        lambda: "the patient started a new treatment",
    ]
    parts: list[str] = []
    length = 0
    while length < size:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(8, 20)))
        if rng.random() < 0.5:
            words = sentence.split(" ")
            words.insert(rng.randrange(len(words)), rng.choice(fillers)())
            sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + ("." if rng.random() < 0.85 else ".\n\n")
        parts.append(sentence)
        length += len(sentence) + 1
    return " ".join(parts)[:size]


# --- in a child process -------------------------------------------------------------------------


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def lifted_parsed_and_run(raw: bytes) -> Coroutine[Any, Any, dict[str, Any]]:
    """In a worker: the body as parsed_and_run reads it, its input built without the model's length
    checks and analyze's row cap lifted, then analyze_data on it (a coroutine: the worker awaits it)."""
    analyze_module.MAX_ROWS = 2**62
    return analyze_data(AnalyzeInput.model_construct(**json.loads(raw)["input"]))


async def _ours_in_one_trip(raw: bytes, lifted: bool, repeat: int) -> dict[str, Any]:
    """analyze_data as the server runs a large body that needs no consent or approval check: parsed,
    validated and run in one worker call (operation_routes.parsed_and_run)."""
    pool = WorkerPool(1)
    await pool.start(preload=["agent_runtime.operation_routes", analyze_data.__module__, "bench.operations"])
    try:
        times, encoded = [], b""
        for _ in range(repeat):
            started = time.perf_counter()
            if lifted:
                encoded = await pool.run_json(lifted_parsed_and_run, bulk(raw))
            else:
                encoded = await pool.run_json(parsed_and_run, (analyze_data, bulk(raw), AnalyzeInput))
            times.append(time.perf_counter() - started)
        (pid,) = pool.pids
        worker_peak = _hwm_mib(pid)
    finally:
        await pool.close()
    return {"seconds": statistics.median(times), "worker_peak_mib": worker_peak, "encoded": encoded}


async def _ours_in_two_trips(raw: bytes, repeat: int) -> dict[str, Any]:
    """process_document as the server runs a large body whose subject's consent it checks (GDPR):
    parsed and validated in a worker, then run in a worker."""
    pool = WorkerPool(1)
    await pool.start(preload=["agent_runtime.operation_routes", process_document.__module__, "bench.operations"])
    try:
        parse_times, run_times, encoded = [], [], b""
        for _ in range(repeat):
            started = time.perf_counter()
            _, argument = await pool.run(parsed_body, (bulk(raw), DocumentInput, False, True))
            parsed = time.perf_counter()
            encoded = await pool.run_json(process_document, argument)
            parse_times.append(parsed - started)
            run_times.append(time.perf_counter() - parsed)
        (pid,) = pool.pids
        worker_peak = _hwm_mib(pid)
    finally:
        await pool.close()
    return {
        "parse": statistics.median(parse_times),
        "run": statistics.median(run_times),
        "seconds": statistics.median(p + r for p, r in zip(parse_times, run_times, strict=True)),
        "worker_peak_mib": worker_peak,
        "encoded": encoded,
    }


def pandas_analyze(data: bytes) -> dict[str, Any]:
    """analyze_data's answer, computed by pandas: the same figures, in the same shape."""
    import pandas as pd

    frame = pd.read_csv(io.BytesIO(data))
    numbers = frame.select_dtypes("number")
    count, mean, std = numbers.count(), numbers.mean(), numbers.std(ddof=1)
    low, high = numbers.min(), numbers.max()
    cuts = numbers.quantile(list(QUANTILES.values()))  # linear: statistics' "inclusive" method
    result: dict[str, Any] = {"rows": len(frame), "columns": {}, "correlation": {}, "outliers": {}}
    for name in numbers.columns:
        q = dict(zip(QUANTILES, cuts[name].tolist(), strict=True))
        result["columns"][name] = {
            "count": int(count[name]),
            "mean": float(mean[name]),
            "min": float(low[name]),
            "max": float(high[name]),
            "std": float(std[name]),
            "quantiles": q,
        }
        spread = q["p75"] - q["p25"]
        column = numbers[name]
        outside = column[(column < q["p25"] - 1.5 * spread) | (column > q["p75"] + 1.5 * spread)]
        result["outliers"][name] = [
            {"row": row, "value": value} for row, value in zip(outside.index.tolist(), outside.tolist(), strict=True)
        ]
    matrix = numbers.corr()  # Pearson, over the rows where both have a number
    names = list(numbers.columns)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            r = float(matrix.at[first, second])
            if math.isfinite(r):
                result["correlation"][f"{first}~{second}"] = r
    return result


def child(args: argparse.Namespace) -> None:
    os.nice(NICENESS)
    workdir = Path(args.workdir)
    out: dict[str, Any] = {}
    if args.child == "analyze-pandas":
        data = Path(args.input).read_bytes()
        import pandas  # noqa: F401 - imported before the clock starts, as ours is

        out["rss_before_mib"] = _rss_mib()
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            encoded = json_bytes(pandas_analyze(data))  # the encoder ours uses (orjson)
            times.append(time.perf_counter() - started)
        out["seconds"] = statistics.median(times)
    elif args.child == "analyze-ours":
        raw = json.dumps({"input": {"csv": Path(args.input).read_text()}}).encode()
        out["rss_before_mib"] = _rss_mib()
        ours = asyncio.run(_ours_in_one_trip(raw, args.lifted, args.repeat))
        encoded = ours.pop("encoded")
        out.update(ours)
    elif args.child == "document-ours":
        raw = json.dumps({"input": {"content": Path(args.input).read_text(), "format": "text"}}).encode()
        ours = asyncio.run(_ours_in_two_trips(raw, args.repeat))
        encoded = ours.pop("encoded")
        out.update(ours)
    elif args.child == "document-floor":
        text = Path(args.input).read_text()
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            len(text.split())
            times.append(time.perf_counter() - started)
        out["seconds"] = statistics.median(times)
        encoded = b"{}"
    (workdir / f"{args.child}.json").write_bytes(encoded)
    # Not ru_maxrss: Linux carries it over exec from the forked copy of the parent, whose pages it
    # counts; VmHWM is this program's own.
    out["peak_mib"] = _hwm_mib(os.getpid())
    print(json.dumps(out))


def run_child(workdir: Path, kind: str, path: Path, *extra: str) -> tuple[dict[str, Any], dict[str, Any]]:
    command = [
        sys.executable,
        "-m",
        "bench.operations",
        "--child",
        kind,
        "--input",
        str(path),
        "--workdir",
        str(workdir),
        *extra,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=False)
    if output.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{output.stderr}")
    measured = json.loads(output.stdout.strip().splitlines()[-1])
    return measured, json.loads((workdir / f"{kind}.json").read_bytes())


# --- the limits ---------------------------------------------------------------------------------


def _accepted(raw: bytes, model: type[AnalyzeInput]) -> str | None:
    """None when the operation takes this body (HTTP cap aside), else why not."""
    try:
        _, argument = parsed_body((raw, model, False, True))
        asyncio.run(analyze_data(pickle.loads(argument.data)))  # noqa: S301 - our own pickle
    except InputError as error:
        return f"422 {error}"
    except Exception as error:
        return f"{getattr(error, 'status', '?')} {getattr(error, 'message', error)}"
    return None


def probe_limits(sample: bytes) -> list[str]:
    """The largest CSV (of this generator's rows) that analyze_data takes, through each limit."""
    lines = sample.decode().splitlines(keepends=True)
    header, rows = lines[0], lines[1:]

    def body(n: int) -> bytes:
        return json.dumps({"input": {"csv": header + "".join(rows[:n])}}).encode()

    low, high = 1, len(rows)  # the most rows whose body fits the HTTP cap
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if len(body(middle)) <= MAX_BODY_BYTES else (low, middle - 1)
    fits = low
    csv_bytes = len(header) + sum(len(r) for r in rows[:fits])
    report = [
        f"HTTP body cap (agent_runtime.api.MAX_BODY_BYTES = {MAX_BODY_BYTES:,} bytes): at most {fits:,} rows "
        f"= {csv_bytes / 1e6:.2f} MB of CSV per request (413 payload_too_large above; "
        f"{'accepted' if _accepted(body(fits), AnalyzeInput) is None else 'REFUSED'} at {fits:,} rows)",
    ]
    per_row = csv_bytes / fits
    twenty = int(20_000_000 / per_row)
    big = (header + "".join(rows[i % len(rows)] for i in range(twenty))).encode()[:20_000_000]
    big = big[: big.rfind(b"\n") + 1]
    over = big + rows[0].encode() * 10
    for label, data in (("20 MB of CSV", big), ("just over 20,000,000 characters", over)):
        verdict = _accepted(json.dumps({"input": {"csv": data.decode()}}).encode(), AnalyzeInput)
        count = data.count(b"\n") - 1
        report.append(f"model/operation, {label} ({count:,} rows): {'accepted' if verdict is None else verdict[:150]}")
    at_cap = body(min(len(rows), analyze_module.MAX_ROWS))
    verdict = _accepted(at_cap, AnalyzeInput)
    report.append(
        f"row cap (analyze.MAX_ROWS = {analyze_module.MAX_ROWS:,}): {analyze_module.MAX_ROWS:,} rows = "
        f"{(len(at_cap) - 16) / 1e6:.1f} MB {'accepted' if verdict is None else verdict} (without the HTTP cap)"
    )
    return report


# --- comparison and tables ----------------------------------------------------------------------


def _close(a: float, b: float, scale: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOLERANCE, abs_tol=REL_TOLERANCE * scale)


class Referee:
    """Third opinions, for the figures where ours and pandas' may part: numpy.corrcoef (two-pass,
    from the exact means) over the rows where both have a number, for each correlation; and
    statistics.fmean (math.fsum's correctly rounded sum over the count) for each mean."""

    def __init__(self, data: bytes) -> None:
        import pandas as pd

        self.frame = pd.read_csv(io.BytesIO(data)).select_dtypes("number")

    def r(self, first: str, second: str) -> float:
        pair = self.frame[[first, second]].dropna()
        return float(np.corrcoef(pair[first].to_numpy(), pair[second].to_numpy())[0, 1])

    def mean(self, name: str) -> float:
        return statistics.fmean(self.frame[name].dropna().tolist())


def compare(
    ours: dict[str, Any], theirs: dict[str, Any], referee: Referee
) -> tuple[int, list[tuple[str, str, str, str]]]:
    """(how many figures were compared, those that differ beyond the tolerance: (figure, ours,
    pandas, how far apart)). Every figure of the answer is compared: the row count, each column's
    count, mean, std, min, max and five quantiles, each outlier's row and value, and each
    correlation. A correlation where pandas' DataFrame.corr and ours part is settled by
    numpy.corrcoef: ours is a mismatch only if it is not within the tolerance of numpy's."""
    found: list[tuple[str, str, str, str]] = []
    compared = 1
    if ours["rows"] != theirs["rows"]:
        found.append(("rows", str(ours["rows"]), str(theirs["rows"]), ""))
    for name in sorted(set(ours["columns"]) | set(theirs["columns"])):
        a, b = ours["columns"].get(name), theirs["columns"].get(name)
        compared += 1
        if a is None or b is None:
            found.append((f"{name}", "present" if a else "missing", "present" if b else "missing", ""))
            continue
        scale = max(abs(b["max"]), abs(b["min"]), 1.0)
        figures = [(k, a[k], b[k]) for k in ("count", "mean", "std", "min", "max")]
        figures += [(k, a["quantiles"][k], b["quantiles"][k]) for k in QUANTILES]
        if set(a) != set(b) or set(a["quantiles"]) != set(b["quantiles"]):
            found.append((f"{name} figures", ",".join(sorted(a)), ",".join(sorted(b)), "not the same figures"))
        for key, x, y in figures:
            compared += 1
            if key == "count" and x != y:
                found.append((f"{name}.count", str(x), str(y), "counts differ"))
            elif not _close(float(x), float(y), b["std"] if key == "std" else scale):
                found.append((f"{name}.{key}", repr(x), repr(y), f"{abs(x - y) / (abs(y) or 1):.1e} rel"))
        outliers_a = [(item["row"], item["value"]) for item in ours["outliers"][name]]
        outliers_b = [(item["row"], item["value"]) for item in theirs["outliers"][name]]
        compared += 2 * len(outliers_b)
        rows_a, rows_b = [row for row, _ in outliers_a], [row for row, _ in outliers_b]
        if rows_a != rows_b:
            differ = len(set(rows_a) ^ set(rows_b)) or "order"
            found.append((f"{name}.outliers", f"{len(rows_a)} rows", f"{len(rows_b)} rows", f"{differ} differ"))
        else:
            values = [(row, x, y) for (row, x), (_, y) in zip(outliers_a, outliers_b, strict=True) if x != y]
            for row, x, y in values[:3]:
                found.append((f"{name}.outliers[row {row}]", repr(x), repr(y), f"{len(values)} values differ"))
    for key in sorted(set(ours["correlation"]) | set(theirs["correlation"])):
        x, y = ours["correlation"].get(key), theirs["correlation"].get(key)
        compared += 1
        if x is None or y is None:
            found.append((f"r({key})", repr(x), repr(y), "present on one side only"))
        elif not math.isclose(x, y, rel_tol=REL_TOLERANCE, abs_tol=1e-12):
            z = referee.r(*key.split("~"))
            if not math.isclose(x, z, rel_tol=REL_TOLERANCE, abs_tol=1e-12):
                found.append((f"r({key})", repr(x), repr(y), f"{abs(x - y) / abs(y):.1e} rel; numpy.corrcoef {z!r}"))
    return compared, found


def pandas_r_errors(ours: dict[str, Any], theirs: dict[str, Any], referee: Referee) -> list[str]:
    """Where pandas' DataFrame.corr is off numpy.corrcoef beyond the tolerance: how far, and how
    far ours is (the reason the correlations are settled by numpy)."""
    lines = []
    for key, y in sorted(theirs["correlation"].items()):
        x = ours["correlation"].get(key)
        if x is None or math.isclose(x, y, rel_tol=REL_TOLERANCE, abs_tol=1e-12):
            continue
        z = referee.r(*key.split("~"))
        lines.append(
            f"r({key}): numpy {z:.16g}, pandas {abs(y - z) / abs(z):.1e} rel off it, ours {abs(x - z) / abs(z):.1e}"
        )
    return lines


def mean_errors(result: dict[str, Any], referee: Referee) -> float:
    """The largest relative distance of a column's mean from statistics.fmean's."""
    worst = 0.0
    for name, figures in result["columns"].items():
        exact = referee.mean(name)
        worst = max(worst, abs(figures["mean"] - exact) / (abs(exact) or 1.0))
    return worst


def _label(rows: int) -> str:
    return f"{rows / 1e6:g}M" if rows >= 1_000_000 else f"{rows / 1e3:g}k"


def bench_analyze(workdir: Path, rows_list: list[int], blank_share: float, profile: bool) -> None:
    sample = make_csv(max(rows_list), blank_share)
    print(f"\nanalyze_data: limits, measured on this generator's CSV ({len(sample) / max(rows_list):.0f} bytes a row)")
    for line in probe_limits(sample):
        print(f"  {line}")
    results = []
    for rows in rows_list:
        data = sample if rows == max(rows_list) else make_csv(rows, blank_share)
        path = workdir / f"data-{rows}.csv"
        path.write_bytes(data)
        lifted = rows > analyze_module.MAX_ROWS or len(data) > 20_000_000
        # The median of a few runs: five where they are short (a shared machine's noise is tens of
        # ms), three at a million rows (a page fault's cost on this VM varies threefold between runs).
        repeat = ["--repeat", str(max(3, min(5, 1_000_000 // rows)))]
        ours, our_result = run_child(workdir, "analyze-ours", path, *repeat, *(["--lifted"] if lifted else []))
        theirs, their_result = run_child(workdir, "analyze-pandas", path, *repeat)
        referee = Referee(data)
        compared, mismatches = compare(our_result, their_result, referee)
        notes = pandas_r_errors(our_result, their_result, referee)
        means = (mean_errors(our_result, referee), mean_errors(their_result, referee))
        del referee
        results.append((rows, len(data), lifted, ours, theirs, compared, mismatches, notes, means, our_result))
    print(
        f"\nanalyze_data vs pandas (8 columns, {blank_share:.0%} of one column blank), the median of 3 to 5 runs"
        f" (3 at 1M rows), niceness {NICENESS}, {os.cpu_count()} cores"
    )
    print(
        f"{'rows':>10}{'CSV MB':>8}  {'limits':9}{'ours s':>9}{'pandas s':>10}{'ratio':>8}"
        f"{'ours peak MiB':>15}{'pandas peak MiB':>17}{'figures':>9}{'mismatches':>12}"
    )
    for rows, size, lifted, ours, theirs, compared, mismatches, *_ in results:
        print(
            f"{rows:>10,}{size / 1e6:>8.1f}  {'lifted' if lifted else 'in force':9}{ours['seconds']:>9.2f}"
            f"{theirs['seconds']:>10.2f}{ours['seconds'] / theirs['seconds']:>7.1f}x"
            f"{ours['worker_peak_mib']:>9.0f} (+{ours['peak_mib']:.0f})"
            f"{theirs['peak_mib']:>11.0f} (+{theirs['peak_mib'] - theirs['rss_before_mib']:.0f})"
            f"{compared:>9,}{len(mismatches):>12}"
        )
    print(
        f"  limits in force: the model's and analyze's limits (the HTTP body cap of {MAX_BODY_BYTES:,} bytes aside: see above);"
        "\n  lifted: over them, so refused by the operation; measured with them lifted (model_construct, MAX_ROWS raised)"
        "\n  ours s: the JSON body parsed and validated, the operation and its answer's JSON, in one worker call"
        "\n  (as the server runs a large body that needs no consent or approval check);"
        "\n  pandas s: from the CSV's bytes to the answer's JSON (encoded as ours is: orjson)"
        "\n  ours peak: the worker's VmHWM (+ the process that holds the body and the answer, as the server does);"
        "\n  pandas peak: its process's VmHWM (+ its growth over the process with the CSV read and pandas imported)"
        f"\n  figures: every figure of the answer, compared (rel {REL_TOLERANCE:g}, or {REL_TOLERANCE:g} of the column's"
        "\n  magnitude near zero); a correlation where pandas and ours part is settled by numpy.corrcoef"
    )
    for rows, _, _, _, _, _, mismatches, notes, means, result in results:
        outliers = sum(len(v) for v in result["outliers"].values())
        print(
            f"  {rows:,} rows: {len(result['columns'])} columns, {len(result['correlation'])} correlations, {outliers:,} outliers compared;"
            f" means off statistics.fmean by at most {means[0]:.1e} rel (ours), {means[1]:.1e} (pandas)"
        )
        for note in notes:
            print(f"    pandas' DataFrame.corr: {note}")
        if mismatches:
            print(f"  mismatches beyond rel {REL_TOLERANCE:g} at {rows:,} rows:")
            print(f"    {'figure':32}{'ours':>26}{'pandas':>26}  difference")
            for figure, x, y, how in mismatches[:40]:
                print(f"    {figure:32}{x:>26}{y:>26}  {how}")
    for rows, _, _, ours, theirs, *_ in results:
        print(
            f"analyze_data {_label(rows)} rows: ours {ours['seconds']:.2f} s, pandas {theirs['seconds']:.2f} s,"
            f" ratio {ours['seconds'] / theirs['seconds']:.2f}x (target <= 1.5x)"
        )
    if profile:
        rows = max(rows_list)
        raw = json.dumps({"input": {"csv": (workdir / f"data-{rows}.csv").read_text()}}).encode()
        analyze_module.MAX_ROWS = max(analyze_module.MAX_ROWS, rows)
        profiler = cProfile.Profile()
        profiler.enable()
        # What the worker does for analyze_data (less validation: the lifted limits), its coroutine
        # wrapper left out so that the table starts at the work.
        argument = AnalyzeInput.model_construct(**json.loads(raw)["input"])
        json_bytes(analyze_module.analyze(argument))
        profiler.disable()
        for order in ("cumulative", "tottime"):
            print(f"\ncProfile of analyze_data on {rows:,} rows (in this process, limits lifted): top 10 by {order}")
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats(order).print_stats(10)
            lines = [line for line in stream.getvalue().splitlines() if line.strip()]
            print("\n".join(line.replace(str(Path.cwd()) + "/", "") for line in lines[3:]))


def bench_documents(workdir: Path, sizes: list[int]) -> None:
    print(f"\nprocess_document, format text, median of the repeats, niceness {NICENESS}, {os.cpu_count()} cores")
    print(
        f"{'size':>10}{'repeats':>9}{'ours s':>9}{'(parse':>8}{'+ run)':>8}{'ours MB/s':>11}{'run MB/s':>10}"
        f"{'floor MB/s':>12}{'x floor':>9}{'worker peak MiB':>17}{'findings':>10}"
    )
    for size in sizes:
        text = make_text(size)
        path = workdir / f"text-{size}.txt"
        path.write_text(text)
        repeat = max(1, min(10, 2_000_000 // size))
        ours, result = run_child(workdir, "document-ours", path, "--repeat", str(repeat))
        floor, _ = run_child(workdir, "document-floor", path, "--repeat", str(max(3, repeat)))
        mb = len(text.encode()) / 1e6
        over = " (over the HTTP cap)" if len(json.dumps({"input": {"content": text}})) > MAX_BODY_BYTES else ""
        print(
            f"{size / 1e6:>8.1f}MB{repeat:>9}{ours['seconds']:>9.3f}{ours['parse']:>8.3f}{ours['run']:>8.3f}"
            f"{mb / ours['seconds']:>11.2f}{mb / ours['run']:>10.2f}{mb / floor['seconds']:>12.0f}"
            f"{floor['seconds'] and ours['seconds'] / floor['seconds']:>8.0f}x{ours['worker_peak_mib']:>17.0f}"
            f"{len(result['pii']) + len(result['phi']):>10,}{over}"
        )
    print(
        "  floor: one str.split() over the text, what reading it once costs; not a competitor (no library does\n"
        f"  this operation's work); MAX_CHARACTERS = {MAX_CHARACTERS:,}, HTTP body cap {MAX_BODY_BYTES:,} bytes"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--blank-share", type=float, default=0.01, help="share of blank cells in the last column")
    parser.add_argument("--doc-sizes", type=int, nargs="+", default=[100_000, 1_000_000, MAX_CHARACTERS])
    parser.add_argument("--profile", action="store_true", help="cProfile analyze_data on the largest --rows")
    parser.add_argument("--only", choices=["analyze", "documents"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--lifted", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    import pandas

    print(f"pandas {pandas.__version__}, numpy {np.__version__}, Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="bench-operations-") as tmp:
        if args.only in (None, "analyze"):
            bench_analyze(Path(tmp), sorted(args.rows), args.blank_share, args.profile)
        if args.only in (None, "documents"):
            bench_documents(Path(tmp), sorted(args.doc_sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""analyze_data's engine: CSV parsed by pandas' C reader (the only use of pandas here); every
statistic computed on numpy float64 arrays, one per column, NaN marking a cell that is not a number.
The work is linear in the cells: a few vectorised passes per column, one partial sort per column for
the quantiles, and correlation over a bounded number of columns. No Python object is made per cell
of a numeric column.

A module of its own, imported only where the work runs: the CPU workers (their fork server preloads
it). numpy and pandas cost the server process about 50 MB it would never use."""

from __future__ import annotations

import csv
import io
import math
import re
import warnings
from collections.abc import Callable, Iterator
from typing import IO, Any, cast

import numpy as np
import numpy.typing as npt
import pandas as pd

from agent_runtime.operations import analyze as limits  # read at each call: a benchmark lifts them
from agent_runtime.operations.analyze import AnalyzeInput

Floats = npt.NDArray[np.float64]


# --- which cells are numbers ----------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A JSON record's value as a number: finite ints and floats, and strings float() reads."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an int beyond a float's range: no number (it was a 422 before)
            return None
        return number if math.isfinite(number) else None
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


# A CSV cell is a number when it is ASCII decimal notation, as pandas' C reader reads numbers: so
# a column's cells count the same whether the reader made the column numeric or left it text.
# float() also takes "1_000", non-ASCII digits (Arabic-Indic, full-width) and non-ASCII spaces: text here.
_NUMBER_CHARACTERS = "0123456789.eE+- \t\n\r\x0b\x0c"
_DECIMAL = re.compile(r"[ \t\n\r\x0b\x0c]*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t\n\r\x0b\x0c]*")


def _cell_number(cell: object) -> float:
    """A cell of a column the C reader left as text (or mixed) as a number, NaN when it is none."""
    if type(cell) is str:
        # lstrip first: it refuses most text ("abc", "r17") at a fraction of a regular expression's cost
        if cell.lstrip(_NUMBER_CHARACTERS) or _DECIMAL.fullmatch(cell) is None:
            return math.nan
        number = float(cell)  # float() reads everything _DECIMAL matches, correctly rounded
    elif isinstance(cell, bool) or not isinstance(cell, int | float):  # "True" read as a bool is no number
        return math.nan
    else:
        try:
            number = float(cell)  # an int beyond int64, read by the C reader as a Python int
        except OverflowError:
            return math.nan
    return number if math.isfinite(number) else math.nan


def _as_floats(column: pd.Series) -> Floats:
    """A column of the C reader's frame as float64, NaN where a cell is not a finite number."""
    kind = column.dtype.kind
    if kind == "b":  # every cell True/False (or a variant): no numbers
        return np.full(len(column), np.nan)
    if kind in "iuf":  # the reader found only numbers and blanks: no Python object per cell
        values: Floats = column.to_numpy(dtype=np.float64, na_value=np.nan)  # a float column's own array
        infinite = np.isinf(values)
        return np.where(infinite, np.nan, values) if infinite.any() else values  # "inf", "1e999": no numbers
    # Text (str cells, NaN for blanks) or Python objects: a chunk of numbers and a chunk of text (the
    # reader reads 262,144 rows at a time), bools among blanks, ints beyond int64. Cell by cell,
    # about a microsecond each: a vectorised verdict (pd.to_numeric) and conversion (astype) were
    # measured only 20 % faster, for more code that must agree with float().
    cells = column.to_numpy(dtype=object)
    return np.fromiter(map(_cell_number, cells), dtype=np.float64, count=len(cells))


# --- the columns of each source -------------------------------------------------------------------


def _select(names: list[str], wanted: list[str] | None) -> list[str]:
    if wanted is not None:
        known = set(names)
        missing = [name for name in wanted if name not in known]
        if missing:
            raise ValueError(f"columns: not in the data: {', '.join(missing)}")
        return list(dict.fromkeys(wanted))
    return names[: limits.MAX_COLUMNS]


class _AsciiReader(io.RawIOBase):
    """ASCII text read as bytes, a piece at a time, as pandas' reader asks for them: the text is
    never encoded whole (70 MB of fresh memory at a million rows, whose page faults alone cost this
    VM 0.05 to 0.2 s)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self._text = text
        self._position = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._text) if size is None or size < 0 else self._position + size
        piece = self._text[self._position : end]
        self._position += len(piece)
        return piece.encode("ascii")


def _csv_source(text: str) -> Callable[[], IO[bytes]]:
    """Opens the text as bytes for pandas' reader, once per read: ASCII text (the str knows it
    without a scan) piece by piece, anything else encoded once, whole."""
    if text.isascii():
        return lambda: cast(IO[bytes], _AsciiReader(text))
    try:
        data = text.encode()
    except UnicodeEncodeError as error:  # a lone surrogate from a JSON escape
        raise ValueError(f"csv: not encodable as UTF-8 at character {error.start}") from None
    return lambda: io.BytesIO(data)


def _read_csv(source: Callable[[], IO[bytes]], **options: Any) -> pd.DataFrame:
    """pandas' C reader, with only its CSV parsing: every other convenience (NA words, dates,
    thousands separators, comments) is off or harmless here, since a cell that is not ASCII decimal
    notation becomes NaN either way."""
    try:
        with warnings.catch_warnings():
            # Mixed types in a column (numbers in one chunk, text in another) are handled by _as_floats.
            warnings.simplefilter("ignore", pd.errors.DtypeWarning)
            return pd.read_csv(source(), engine="c", index_col=False, **options)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, ValueError) as error:  # an unclosed quote, a field too long
        message = str(error).strip().replace("\n", " ")
        raise ValueError(f"csv: cannot be parsed: {message}") from None


# pandas makes an object per header field (about 1 KB each): a megabyte of commas would be a
# million columns and a gigabyte before any row is read. Far more than MAX_COLUMNS are still taken.
MAX_HEADER_FIELDS = 10_000


def _lines(text: str) -> Iterator[str]:
    """The text's lines, each with its line break, made one at a time as they are read: the header
    needs only the first few (io.StringIO would copy the whole text first, 0.2 s for 70 MB)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start) + 1 or len(text)
        yield text[start:end]
        start = end


def _header_width(text: str) -> int:
    """The fields of the header record (the first line that is not blank), by the csv module,
    which reads one record and stops: quoted line breaks included, nothing else made."""
    try:
        for row in csv.reader(_lines(text)):
            if len(row) > 1 or any(cell.strip() for cell in row):
                return len(row)
    except csv.Error as error:  # a header field beyond the csv module's 128 KiB
        raise ValueError(f"csv: cannot be parsed: {error}") from None
    return 0


def _csv_columns(text: str, wanted: list[str] | None) -> tuple[int, dict[str, Floats]]:
    source = _csv_source(text)
    width = _header_width(text)
    if width > MAX_HEADER_FIELDS:
        raise ValueError(f"csv: the header has {width} fields, more than {MAX_HEADER_FIELDS}")
    # The header as written: pandas renames "" and repeated names ("Unnamed: 1", "a.1"). Unlike the
    # csv module (the reader before pandas), pandas drops a leading byte-order mark, and skips lines
    # of only blanks as it skips empty ones (csv.DictReader counted them as rows without numbers).
    head = _read_csv(source, header=None, nrows=1, dtype=str, keep_default_na=False, na_filter=False)
    header = [] if head.empty else [str(name) for name in head.iloc[0].tolist()]
    position: dict[str, int] = {}  # each name's column; first seen gives the order
    repeated: list[str] = []
    for index, name in enumerate(header):
        if name in position and name:
            repeated.append(name)
        position[name] = index  # an unnamed column ("a,b,,"), repeated: the last one, as csv.DictReader did
    if repeated:
        raise ValueError(f"csv: the header names a column more than once: {', '.join(dict.fromkeys(repeated))}")
    selected = _select(list(position), wanted)
    if not header:
        return 0, {}
    # usecols: a row longer than the header has its extra fields ignored (csv.DictReader's restkey),
    # a shorter one its missing cells read as blanks. With no column selected, the rows are counted.
    indices = sorted(position[name] for name in selected) or [0]
    # The row cap is checked once all is read: the model's length cap bounds that work (about 0.2 s
    # for 20 MB), and nrows, which would stop the reader early, slows it by half on every input.
    frame = _read_csv(source, header=0, usecols=indices)
    if len(frame) > limits.MAX_ROWS:
        raise ValueError(f"csv: more than {limits.MAX_ROWS} rows")
    by_index = {index: frame.iloc[:, i] for i, index in enumerate(indices[: len(frame.columns)])}
    columns = {name: _as_floats(by_index[position[name]]) for name in selected if position[name] in by_index}
    return len(frame), columns


def _record_columns(records: list[dict[str, Any]], wanted: list[str] | None) -> tuple[int, dict[str, Floats]]:
    """The numbers of JSON records by column: a Python pass over the cells, which JSON parsing has
    already made Python objects (and the model bounds in number)."""
    names: dict[str, None] = {}  # every column, in the order first seen
    for record in records:
        names.update(dict.fromkeys(record))
    selected = _select(list(names), wanted)
    rows: dict[str, list[int]] = {name: [] for name in selected}
    values: dict[str, list[float]] = {name: [] for name in selected}
    for row, record in enumerate(records):
        for name, value in record.items():
            found = rows.get(name)
            if found is not None and (number := _number(value)) is not None:
                found.append(row)
                values[name].append(number)
    columns: dict[str, Floats] = {}
    for name in selected:
        column = np.full(len(records), np.nan)
        column[np.asarray(rows[name], dtype=np.intp)] = np.asarray(values[name], dtype=np.float64)
        columns[name] = column
    return len(records), columns


# --- statistics -----------------------------------------------------------------------------------


def _dot(x: Floats, y: Floats) -> float:
    """The sum of products, by numpy's own loop: np.dot hands it to the threads of OpenBLAS, which on
    a busy machine wait milliseconds for a core at each call (7 ms for 100k numbers, measured), and
    round no better."""
    return float(np.einsum("i,i->", x, y))


# What the extended-precision sum below may be off by, relative to the sum, before math.fsum is
# asked instead: far below the 1e-9 the benchmark allows, and reached only when the sum cancels to
# about 2e-6 of n times the largest magnitude (bench/operations.py's columns: 3e-5 at the least,
# Student's t, symmetric and heavy-tailed). The bound is a worst case: the sum is then mostly exact.
_SUM_BOUND = 1e-12
_LONG_EPSILON = float(np.finfo(np.longdouble).eps)  # 2**-63 on x86; a float's 2**-52 where no longer


def _sum(values: Floats, largest: float) -> float:
    """math.fsum(values), at a twentieth of its cost: summed pairwise in extended precision (x86's
    80-bit long double, 11 more bits than a float), which rounds as fsum's but for rare ties; fsum
    itself where the numbers cancel out enough for those bits not to be enough. ``largest``: the
    largest magnitude among the values."""
    total = float(np.sum(values, dtype=np.longdouble))
    # Pairwise summation's error bound: log2(n) roundings, each of an epsilon of the sum of the
    # magnitudes (at most n times the largest).
    bound = len(values) * largest * (math.log2(len(values)) + 2) * _LONG_EPSILON
    if math.isfinite(bound) and bound > _SUM_BOUND * abs(total):
        return math.fsum(values.tolist())
    return total  # inf when beyond a float's range: _moments then scales


class Centred:
    """One series' deviations from its mean, their sum and their corrected sum of squares: what the
    standard deviation and Pearson's r need. The sum of squares is corrected as in Chan, Golub and
    LeVeque's two-pass algorithm: the deviations' sum, zero but for rounding, is taken out, so a
    large offset with a small spread keeps its spread exact."""

    def __init__(self, values: Floats, *, reported: bool = True) -> None:
        """``reported``: the mean is reported, so it is statistics.fmean's; else (a pair's rows, for
        Pearson's r) a float's pairwise sum is enough, since the correction takes out its error."""
        count = self.count = len(values)
        self.minimum, self.maximum = float(values.min()), float(values.max())
        self.constant = count < 2 or self.minimum == self.maximum
        if reported:
            self.mean = _sum(values, max(-self.minimum, self.maximum)) / count  # fsum / count
        else:
            self.mean = float(np.mean(values))
        self.deviations: Floats = values - self.mean
        self.total = float(self.deviations.sum())
        self.squares = _dot(self.deviations, self.deviations) - self.total * self.total / count

    def std(self) -> float:
        return math.sqrt(max(self.squares, 0.0) / (self.count - 1)) if self.count > 1 else 0.0

    def products(self, other: Centred) -> float:
        """The corrected sum of the products of the two series' deviations (over the same rows)."""
        return _dot(self.deviations, other.deviations) - self.total * other.total / self.count


def _scale(values: Floats) -> int:
    """The power of two that brings the largest magnitude into [0.5, 1)."""
    return math.frexp(float(np.max(np.abs(values))))[1]


def _moments(values: Floats, centred: Centred) -> tuple[float, float]:
    """(mean, sample standard deviation) of ``values``, whose Centred is ``centred``.

    Numbers whose sums or squares leave a float's range (beyond about 1e154, or below 1e-154) are
    scaled by a power of two, which is exact, and the results scaled back."""
    mean, std = centred.mean, centred.std()
    if math.isfinite(mean) and math.isfinite(std) and (std > 0 or centred.constant):
        return mean, std
    exponent = _scale(values)
    scaled = Centred(np.ldexp(values, -exponent))
    try:
        if not math.isfinite(mean):  # else kept: scaled down, the smallest numbers can underflow
            mean = math.ldexp(scaled.mean, exponent)
        std = math.ldexp(scaled.std(), exponent)
    except OverflowError:  # a spread of two numbers near ±1.8e308, say: no float holds it
        raise ArithmeticError("a standard deviation is beyond a float's range") from None
    return mean, std


# The cut points reported, as (i, n): the i-th of statistics.quantiles(data, n=n)'s cut points.
_CUTS = {"p5": (1, 20), "p25": (1, 4), "p50": (2, 4), "p75": (3, 4), "p95": (19, 20)}


def _quantiles(values: Floats) -> dict[str, float]:
    """The 5/25/50/75/95th percentiles, interpolated linearly between closest ranks: numpy's
    default method, and statistics.quantiles(method="inclusive"), whose arithmetic this repeats
    to give its very numbers. The ten order statistics needed come from a sort: numpy's vectorised
    sort of a million floats took 5.6 ms here, a partition at those ten ranks 16.6 ms."""
    if len(values) == 1:
        value = float(values[0])
        return dict.fromkeys(_CUTS, value)
    last = len(values) - 1
    ranks = {key: divmod(i * last, n) for key, (i, n) in _CUTS.items()}  # (j, delta) as statistics has them
    ordered = np.sort(values)
    cuts: dict[str, float] = {}
    for key, (j, delta) in ranks.items():
        n = _CUTS[key][1]
        low, high = float(ordered[j]), float(ordered[j + 1])
        cut = (low * (n - delta) + high * delta) / n
        if not math.isfinite(cut):  # beyond a float's range on the way: scaled by a power of two
            exponent = math.frexp(max(abs(low), abs(high)))[1]
            low, high = math.ldexp(low, -exponent), math.ldexp(high, -exponent)
            cut = math.ldexp((low * (n - delta) + high * delta) / n, exponent)
        cuts[key] = cut
    return cuts


def describe(values: Floats, centred: Centred | None = None) -> dict[str, Any]:
    """count, mean, min, max, std and quantiles of a column's numbers (at least one)."""
    centred = centred or Centred(values)
    mean, std = _moments(values, centred)
    return {
        "count": centred.count,
        "mean": mean,
        "min": centred.minimum,
        "max": centred.maximum,
        "std": std,
        "quantiles": _quantiles(values),
    }


def _pearson(x: Centred, y: Centred) -> float | None:
    if x.constant or y.constant:
        return None
    denominator = math.sqrt(x.squares * y.squares)
    if not (denominator > 0 and math.isfinite(denominator)):  # under- or overflow: no r to give
        return None
    return x.products(y) / denominator


def correlations(columns: dict[str, Floats], own: dict[str, Centred] | None = None) -> dict[str, float]:
    """Pearson's r of each pair among the first limits.MAX_CORRELATED columns, over the rows where both
    have a number. k columns make k(k-1)/2 pairs, so k is bounded: the work is at most
    limits.MAX_CORRELATED / 2 passes over the cells, whatever the number of columns.

    ``columns``: full length, NaN where a row has no number. ``own``: the Centred of a column's
    numbers, where already made; a pair with the same rows uses them (a complete table: no pair
    needs its own pass but for the products), another pair centres its common rows itself."""
    names = list(columns)[: limits.MAX_CORRELATED]
    present = {name: ~np.isnan(columns[name]) for name in names}
    own = dict(own or {})

    def centred(name: str) -> Centred:
        if name not in own:
            own[name] = Centred(columns[name][present[name]])
        return own[name]

    found: dict[str, float] = {}
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            if np.array_equal(present[first], present[second]):
                r = _pearson(centred(first), centred(second))
            elif (both := present[first] & present[second]).any():  # the rows where both have a number
                # A column with a number on each of those rows keeps its own deviations (a complete
                # column paired with one with gaps: only the complete one is centred again).
                x, y = (
                    centred(name)
                    if np.array_equal(both, present[name])
                    else Centred(columns[name][both], reported=False)
                    for name in (first, second)
                )
                r = _pearson(x, y)
            else:
                r = None
            if r is not None:
                found[f"{first}~{second}"] = r
    return found


def analyze(request: AnalyzeInput) -> dict[str, Any]:
    if request.data is not None:
        rows, columns = _record_columns(request.data, request.columns)
    else:
        rows, columns = _csv_columns(request.csv or "", request.columns)
    result: dict[str, Any] = {"rows": rows, "columns": {}, "correlation": {}, "outliers": {}}
    numeric: dict[str, Floats] = {}
    kept: dict[str, Centred] = {}  # the correlated columns' deviations, made once for describe
    # Overflow and underflow are looked for in the results (and answered by scaling): no warnings.
    with np.errstate(all="ignore"):
        for name, column in columns.items():
            present = ~np.isnan(column)
            values = column if present.all() else column[present]
            if not len(values):
                continue
            numeric[name] = column
            centred = Centred(values)
            if len(kept) < limits.MAX_CORRELATED:
                kept[name] = centred
            try:
                summary = result["columns"][name] = describe(values, centred)
            except ArithmeticError as error:
                raise ValueError(f"{'data' if request.data is not None else 'csv'}: column {name!r}: {error}") from None
            q1, q3 = summary["quantiles"]["p25"], summary["quantiles"]["p75"]
            low, high = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
            outside = np.flatnonzero((column < low) | (column > high))  # NaN is neither
            result["outliers"][name] = [
                {"row": row, "value": value}
                for row, value in zip(outside.tolist(), column[outside].tolist(), strict=True)
            ]
        result["correlation"] = correlations(numeric, kept)
    return result

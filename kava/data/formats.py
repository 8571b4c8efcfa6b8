"""Source loaders: every supported schema becomes a list of :class:`Example`.

One small parser per schema turns a raw row into ``Example(question, steps,
answer)``. Representation shared by all sources:

- ``question``: the question text, stripped at both ends (inner spacing kept).
- ``steps``: the CoT steps. An equation step is written with its calculator
  brackets, e.g. ``"<<48/2=24>>"``; a natural-language step is a sentence or a
  solution line with any ``<<...>>`` annotation removed.
- ``answer``: the gold answer as a string. Numbers from numeric fields are
  written canonically (``5.0 -> "5"``); thousands commas are removed
  (``"5,000" -> "5000"``). A non-numeric answer is kept as is: dropping it is a
  filter's job (:mod:`kava.data.filters`), not a load error.

Malformed rows raise :class:`DataError` naming the source, the 1-based line
(text files) or row (JSON lists, CSV, parquet, hub data) and what was expected.
With ``skip_bad_rows=True`` they are skipped and counted per reason instead.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from kava.answers import format_number
from kava.data import Example

__all__ = [
    "DataError",
    "LoadResult",
    "load_examples",
    "FORMATS",
    "HUB_FORMATS",
    "BENCHMARKS",
    "resolve_benchmark",
    "load_benchmark",
    "default_data_dir",
    "split_cot",
    "normalize_answer",
    "parse_split",
    "splits_disjoint",
]

FORMATS = ("gsm8k-aug", "codi", "icot", "gsm8k", "gsm-hard", "svamp", "multiarith", "mawps", "generic")

# Known hub ids (lower-cased) -> format. Ids starting with a key ending in "*" match by prefix.
HUB_FORMATS: dict[str, str] = {
    "openai/gsm8k": "gsm8k",
    "gsm8k": "gsm8k",
    "whynlp/gsm8k-aug": "gsm8k-aug",
    "whynlp/gsm8k-aug-nl": "gsm8k-aug",
    "zen-e/gsm8k-aug*": "codi",
    "reasoning-machines/gsm-hard": "gsm-hard",
    "chilled/svamp": "svamp",
    "chilled/multiarith": "multiarith",
}

# Evaluation benchmarks: short name -> (hub id, hub config, hub split, local file name or None).
# SVAMP (1000) and MultiArith (600) are the union of the hub's train and test splits.
BENCHMARKS: dict[str, tuple[str, str | None, str, str | None]] = {
    "gsm8k": ("openai/gsm8k", "main", "test", "gsm8k_test.jsonl"),
    "gsm-hard": ("reasoning-machines/gsm-hard", None, "train", "gsm_hard.jsonl"),
    "svamp": ("ChilleD/SVAMP", None, "train+test", "svamp.json"),
    "multiarith": ("ChilleD/MultiArith", None, "train+test", None),
}

_EXPECTED = {
    "gsm8k-aug": "expected keys question, steps (list of strings), answer",
    "codi": "expected keys question, cot, answer",
    "icot": "expected a line 'question||<<eq>> <<eq>> ... #### answer'",
    "gsm8k": "expected keys question, answer (a solution ending in '#### N')",
    "gsm-hard": "expected keys input, target (a number)",
    "svamp": "expected keys Body, Question, Answer",
    "multiarith": "expected keys question, final_ans (or answer)",
    "mawps": "expected keys sQuestion, lSolutions (one answer: a one-element list or a number)",
}

_ANNOTATION = re.compile(r"<<(.*?)>>", re.S)
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# "train" or "train[a:b]": a split name, optionally sliced by 0-based row index (Python slice semantics).
_SPLIT = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(?:\[\s*(-?\d+)?\s*:\s*(-?\d+)?\s*\])?\s*$")


class DataError(ValueError):
    """A data source is missing, malformed or of an unknown format.

    The message is one line: ``<source>:<line or row>: <what is wrong> (<what was expected>)``.
    """


@dataclass
class LoadResult:
    examples: list[Example]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count of skipped rows
    source: str = ""  # the file path or hub label the rows came from
    format: str = ""  # the schema used to parse them


class _RowError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# ----------------------------------------------------------------------------
# helpers shared by the parsers
# ----------------------------------------------------------------------------
def normalize_answer(ans: Any) -> str:
    """Answer string: numbers written canonically, thousands commas removed, else stripped text."""
    if isinstance(ans, bool):
        raise _RowError("wrong_type", f"answer must be a string or a number, got bool {ans!r}")
    if isinstance(ans, (int, float)):
        try:
            return format_number(ans)
        except ValueError:
            return str(ans)
    if not isinstance(ans, str):
        raise _RowError("wrong_type", f"answer must be a string or a number, got {type(ans).__name__}")
    s = ans.strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def split_cot(cot: str) -> list[str]:
    """Split a CoT string into steps.

    - Only ``<<...>>`` annotations (separated by spaces): each annotation is a step, brackets kept.
    - Several lines: each non-empty line is a step (annotations stripped).
    - Otherwise: sentences (split after ``.``, ``!`` or ``?`` followed by whitespace).
    """
    cot = cot.strip()
    if not cot:
        return []
    if _ANNOTATION.search(cot) and not _ANNOTATION.sub("", cot).strip():
        return [f"<<{a}>>" for a in _ANNOTATION.findall(cot)]
    text = _strip_annotations(cot)
    if "\n" in text:
        return [ln.strip() for ln in text.splitlines() if ln.strip()]
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def parse_split(split: str, source: str = "split") -> tuple[str, int | None, int | None] | None:
    """``"train"`` -> ``("train", None, None)``; ``"train[:-500]"`` -> ``("train", None, -500)``.

    A slice selects rows of the named split by 0-based index with Python's slice semantics
    (the same rows as the hub's ``split="train[:-500]"``), so a source with no validation split
    can hold out a fixed slice of its train split (``train[:-500]`` / ``train[-500:]``).
    Returns None for a split without brackets (passed to the hub as is, e.g. ``train+test``).
    Percent slices, steps and sliced unions are not supported.
    """
    if "[" not in split and "]" not in split:
        return None
    m = _SPLIT.match(split)
    if not m:
        raise DataError(f"{source}: malformed split {split!r} (expected a split name, optionally sliced by "
                        "row index, e.g. train, train[:-500] or train[-500:])")
    start = int(m.group(2)) if m.group(2) is not None else None
    stop = int(m.group(3)) if m.group(3) is not None else None
    return m.group(1), start, stop


def splits_disjoint(a: str, b: str) -> bool:
    """Whether two split specs of one source provably share no row, whatever the split's length.

    Different split names are disjoint. Slices of one split are disjoint when one ends where (or
    before) the other starts, with both bounds counted from the same end (``train[:-500]`` and
    ``train[-500:]``, or ``train[:1000]`` and ``train[1000:]``); anything else is not provable.
    """
    pa, pb = parse_split(a), parse_split(b)
    names_a = {pa[0]} if pa else {x.strip() for x in a.split("+")}  # "train+test" is two splits
    names_b = {pb[0]} if pb else {x.strip() for x in b.split("+")}
    if not names_a & names_b:
        return True
    if pa is None or pb is None:  # a whole split overlaps any non-empty part of itself
        return False

    def ordered(x, y) -> bool:  # x ends at or before y starts, both bounds from the same end
        stop, start = x[2], y[1]
        if stop is None or start is None or (stop < 0) != (start < 0):
            return False
        return stop <= start

    return ordered(pa, pb) or ordered(pb, pa)


def _slice_label(spec: tuple[str, int | None, int | None]) -> str:
    name, start, stop = spec
    return f"{name}[{'' if start is None else start}:{'' if stop is None else stop}]"


def _select(n: int, spec: tuple[str, int | None, int | None], source: str) -> range:
    """Row indices (0-based) a sliced split selects from ``n`` rows; an empty selection is an error."""
    idx = range(n)[slice(spec[1], spec[2])]
    if len(idx) == 0:
        raise DataError(f"{source}: split {_slice_label(spec)} selects no rows of the {n} in '{spec[0]}' "
                        "(expected a slice that keeps at least one row)")
    return idx


def _strip_annotations(text: str) -> str:
    return _ANNOTATION.sub("", text)


def _get(row: Any, key: str, expected: str) -> Any:
    if not isinstance(row, dict):
        raise _RowError("wrong_type", f"expected a JSON object, got {type(row).__name__} ({expected})")
    if key not in row:
        raise _RowError("missing_field", f"missing field '{key}' ({expected})")
    return row[key]


def _question(value: Any, key: str, expected: str) -> str:
    if not isinstance(value, str):
        raise _RowError("wrong_type", f"field '{key}' must be a string, got {type(value).__name__} ({expected})")
    q = value.strip()
    if not q:
        raise _RowError("empty_question", f"empty question in field '{key}' ({expected})")
    return q


def _answer(value: Any, key: str, expected: str) -> str:
    if isinstance(value, (list, tuple)):  # e.g. MAWPS' lSolutions: [8.0]
        if len(value) != 1:
            raise _RowError(
                "several_answers" if value else "no_answer",
                f"field '{key}' holds {len(value)} values {list(value)[:4]}; expected exactly one answer ({expected})",
            )
        value = value[0]
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _RowError(
            "wrong_type", f"field '{key}' must be a string or a number, got {type(value).__name__} ({expected})"
        )
    return normalize_answer(value)


def _steps_list(value: Any, key: str, expected: str) -> list[str]:
    if isinstance(value, str):
        return split_cot(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise _RowError(
            "wrong_type", f"field '{key}' must be a list of strings or a string, got {type(value).__name__} ({expected})"
        )
    return [s.strip() for s in value if s.strip()]


# ----------------------------------------------------------------------------
# one parser per schema: raw row -> Example (raises _RowError)
# ----------------------------------------------------------------------------
def _parse_gsm8k_aug(row: Any, opts: dict) -> Example:
    exp = _EXPECTED["gsm8k-aug"]
    q = _question(_get(row, "question", exp), "question", exp)
    steps = _get(row, "steps", exp)
    if not isinstance(steps, (list, tuple)) or not all(isinstance(s, str) for s in steps):
        raise _RowError("wrong_type", f"field 'steps' must be a list of strings, got {type(steps).__name__} ({exp})")
    a = _answer(_get(row, "answer", exp), "answer", exp)
    return Example(q, [s.strip() for s in steps if s.strip()], a)


def _parse_codi(row: Any, opts: dict) -> Example:
    exp = _EXPECTED["codi"]
    q = _question(_get(row, "question", exp), "question", exp)
    steps = _steps_list(_get(row, "cot", exp), "cot", exp)
    ans = _get(row, "answer", exp)
    if isinstance(ans, str) and "####" in ans:  # "#### 18": CODI's loader strips the marker too
        ans = ans.rsplit("####", 1)[1]
    a = _answer(ans, "answer", exp)
    return Example(q, steps, a)


def _parse_icot(line: Any, opts: dict) -> Example:
    exp = _EXPECTED["icot"]
    if not isinstance(line, str):
        raise _RowError("wrong_type", f"expected a text line, got {type(line).__name__} ({exp})")
    if "||" not in line:
        raise _RowError("malformed_line", f"no '||' between question and CoT ({exp})")
    q, rest = line.split("||", 1)
    if "####" not in rest:
        raise _RowError("malformed_line", f"no '####' before the answer ({exp})")
    cot, ans = rest.rsplit("####", 1)
    q = q.strip()
    if not q:
        raise _RowError("empty_question", f"empty question ({exp})")
    return Example(q, split_cot(cot), normalize_answer(ans))


def _parse_gsm8k(row: Any, opts: dict) -> Example:
    exp = _EXPECTED["gsm8k"]
    q = _question(_get(row, "question", exp), "question", exp)
    sol = _get(row, "answer", exp)
    if not isinstance(sol, str):
        raise _RowError("wrong_type", f"field 'answer' must be a string, got {type(sol).__name__} ({exp})")
    if "####" not in sol:
        raise _RowError("malformed_solution", f"solution has no '#### N' line ({exp})")
    body, ans = sol.rsplit("####", 1)
    if opts.get("cot_style", "equations") == "nl":
        steps = [ln.strip() for ln in _strip_annotations(body).splitlines() if ln.strip()]
    else:
        steps = [f"<<{a}>>" for a in _ANNOTATION.findall(body)]
    return Example(q, steps, normalize_answer(ans))


def _parse_gsm_hard(row: Any, opts: dict) -> Example:
    exp = _EXPECTED["gsm-hard"]
    q = _question(_get(row, "input", exp), "input", exp)
    return Example(q, [], _answer(_get(row, "target", exp), "target", exp))


def _parse_svamp(row: Any, opts: dict) -> Example:
    exp = _EXPECTED["svamp"]
    body = _get(row, "Body", exp)
    ques = _get(row, "Question", exp)
    for key, v in (("Body", body), ("Question", ques)):
        if not isinstance(v, str):
            raise _RowError("wrong_type", f"field '{key}' must be a string, got {type(v).__name__} ({exp})")
    q = _question(f"{body.strip()} {ques.strip()}", "Body+Question", exp)
    return Example(q, [], _answer(_get(row, "Answer", exp), "Answer", exp))


def _parse_multiarith(row: Any, opts: dict) -> Example:
    exp = _EXPECTED["multiarith"]
    q = _question(_get(row, "question", exp), "question", exp)
    key = "final_ans" if isinstance(row, dict) and "final_ans" in row else "answer"
    return Example(q, [], _answer(_get(row, key, exp), key, exp))


def _parse_mawps(row: Any, opts: dict) -> Example:
    """The classic MAWPS release schema (AddSub, MultiArith, SingleEq, SingleOp): sQuestion, lSolutions."""
    exp = _EXPECTED["mawps"]
    q = _question(_get(row, "sQuestion", exp), "sQuestion", exp)
    return Example(q, [], _answer(_get(row, "lSolutions", exp), "lSolutions", exp))


def _parse_generic(row: Any, opts: dict) -> Example:
    qf, af, cf = opts["question_field"], opts["answer_field"], opts["cot_field"]
    exp = f"expected keys {qf}, {af}" + (f", {cf}" if cf else "")
    q = _question(_get(row, qf, exp), qf, exp)
    a = _answer(_get(row, af, exp), af, exp)
    steps = _steps_list(_get(row, cf, exp), cf, exp) if cf else []
    return Example(q, steps, a)


_PARSERS: dict[str, Callable[[Any, dict], Example]] = {
    "gsm8k-aug": _parse_gsm8k_aug,
    "codi": _parse_codi,
    "icot": _parse_icot,
    "gsm8k": _parse_gsm8k,
    "gsm-hard": _parse_gsm_hard,
    "svamp": _parse_svamp,
    "multiarith": _parse_multiarith,
    "mawps": _parse_mawps,
    "generic": _parse_generic,
}


# ----------------------------------------------------------------------------
# raw row readers: yield (1-based line/row number, row or _RowError)
# ----------------------------------------------------------------------------
_Rows = Iterator[tuple[int, Any]]


def _read_lines(path: Path) -> _Rows:
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield i, line


def _read_jsonl(path: Path) -> _Rows:
    for i, line in _read_lines(path):
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            yield i, _RowError("bad_json", f"not valid JSON ({e.msg} at column {e.colno}; expected one JSON object per line)")


def _read_json(path: Path, split: str | None, source: str) -> _Rows:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved with a .json extension
            yield from _read_jsonl(path)
            return
        raise DataError(f"{source}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}; expected a JSON list of objects)") from None
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if split is not None and split in lists:
            data = lists[split]
        elif len(lists) == 1 and split is None:
            data = next(iter(lists.values()))
        else:
            raise DataError(
                f"{source}:1: expected a JSON list of objects, got an object with keys "
                f"{', '.join(map(str, list(data)[:8]))} (pass split= to pick a list)"
            )
    if not isinstance(data, list):
        raise DataError(f"{source}:1: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data, 1):
        yield i, row


def _read_csv(path: Path) -> _Rows:
    with path.open(encoding="utf-8", newline="") as fh:
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(fh, delimiter=delim)
        for row in reader:
            if None in row:  # more cells than header columns
                yield reader.line_num, _RowError("malformed_line", f"more cells than the {len(reader.fieldnames or [])} header columns")
                continue
            if any(v is None for v in row.values()):
                yield reader.line_num, _RowError("malformed_line", f"fewer cells than the {len(reader.fieldnames or [])} header columns")
                continue
            yield reader.line_num, row


def _read_parquet(path: Path, source: str) -> _Rows:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow ships with datasets
        raise DataError(f"{source}:1: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any pyarrow failure is a data problem
        raise DataError(f"{source}:1: not a readable parquet file ({type(e).__name__}: {e})".replace("\n", " ")) from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield i, row


def _local_rows(path: Path, fmt: str, split: str | None, source: str) -> _Rows:
    name = path.name.lower()
    if fmt == "icot" or name.endswith(".txt"):
        return _read_lines(path)
    if name.endswith(".jsonl"):
        return _read_jsonl(path)
    if name.endswith(".json"):
        return _read_json(path, split, source)
    if name.endswith((".csv", ".tsv")):
        return _read_csv(path)
    if name.endswith(".parquet"):
        return _read_parquet(path, source)
    raise DataError(
        f"{source}:1: unsupported file type '{path.suffix or path.name}' "
        "(expected .jsonl, .json, .csv, .tsv, .parquet or .icot.txt)"
    )


def _sliced(rows: _Rows, spec: tuple[str, int | None, int | None], source: str) -> _Rows:
    """The rows a sliced split selects, numbered as in the whole split (so errors name the file's row)."""
    rows = list(rows)
    for i in _select(len(rows), spec, source):
        yield rows[i]


def _hub_rows(hub_id: str, hub_config: str | None, split: str | None, source: str) -> _Rows:
    import datasets

    spec = parse_split(split, source) if split is not None else None
    try:
        # a slice is taken here, not by the hub, so local files and hub ids select the same rows
        ds = datasets.load_dataset(hub_id, hub_config, split=spec[0] if spec else split)
    except Exception as e:  # noqa: BLE001 - network, missing id, bad split...
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")
        raise DataError(
            f"{source}: could not load from the Hugging Face hub ({msg[:300]}); "
            "expected a local file path or a reachable hub id/config/split"
        ) from None
    if split is None and hasattr(ds, "keys"):
        names = list(ds.keys())
        if len(names) != 1:
            raise DataError(f"{source}: several splits ({', '.join(names)}); expected split= to pick one")
        ds = ds[names[0]]
    if spec is not None:
        idx = _select(len(ds), spec, source)
        part = ds.select(idx) if hasattr(ds, "select") else [ds[i] for i in idx]
        for i, row in zip(idx, part):
            yield i + 1, row
        return
    for i, row in enumerate(ds, 1):
        yield i, row


# ----------------------------------------------------------------------------
# format detection
# ----------------------------------------------------------------------------
def _hub_format(hub_id: str) -> str | None:
    key = hub_id.lower().strip()
    for pat, fmt in HUB_FORMATS.items():
        if (pat.endswith("*") and key.startswith(pat[:-1])) or key == pat:
            return fmt
    return None


def _format_from_row(row: Any, opts: dict) -> str | None:
    if isinstance(row, str):
        return "icot" if "||" in row else None
    if not isinstance(row, dict):
        return None
    keys = set(row)
    if {"question", "steps", "answer"} <= keys and isinstance(row["steps"], (list, tuple)):
        return "gsm8k-aug"
    if {"question", "cot", "answer"} <= keys:
        return "codi"
    if {"input", "target"} <= keys:
        return "gsm-hard"
    if {"Body", "Question", "Answer"} <= keys:
        return "svamp"
    if {"question", "final_ans"} <= keys:
        return "multiarith"
    if {"sQuestion", "lSolutions"} <= keys:
        return "mawps"
    if {"question", "answer"} <= keys and isinstance(row["answer"], str) and "####" in row["answer"]:
        return "gsm8k"
    if {opts["question_field"], opts["answer_field"]} <= keys:
        return "generic"
    return None


def _custom_fields(opts: dict) -> bool:
    return opts["question_field"] != "question" or opts["answer_field"] != "answer" or bool(opts["cot_field"])


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------
def load_examples(
    path_or_id: str,
    *,
    format: str = "auto",
    split: str | None = None,
    hub_config: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    cot_field: str = "",
    cot_style: str = "equations",
    skip_bad_rows: bool = False,
) -> LoadResult:
    """Load examples from a local file, or from the hub when ``path_or_id`` is not an existing path.

    ``format``: one of :data:`FORMATS`, ``"auto"`` (guess from the hub id, the file
    name and the first row's fields; custom field names imply ``generic``) or
    ``"synthetic"`` (files written by :func:`kava.data.synthetic.write_jsonl`, the
    gsm8k-aug schema). ``split`` picks the hub split (or a list inside a JSON
    object); a sliced split such as ``train[-500:]`` (:func:`parse_split`) keeps those rows
    of it, for local files too. ``cot_style`` (``equations`` | ``nl``) applies to the ``gsm8k`` schema.
    """
    if format == "synthetic":
        format = "gsm8k-aug"
    if format != "auto" and format not in _PARSERS:
        raise DataError(f"{path_or_id}: unknown format {format!r} (expected auto, {', '.join(FORMATS)}, synthetic)")
    if cot_style not in ("equations", "nl"):
        raise DataError(f"{path_or_id}: unknown cot_style {cot_style!r} (expected equations or nl)")
    opts = {
        "question_field": question_field,
        "answer_field": answer_field,
        "cot_field": cot_field,
        "cot_style": cot_style,
    }

    path = Path(os.path.expanduser(str(path_or_id)))
    fmt = format
    if path.exists():
        source = str(path_or_id)
        if path.is_dir():
            raise DataError(f"{source}: is a directory (expected a data file: .jsonl, .json, .csv, .parquet or .icot.txt)")
        if fmt == "auto":
            if path.name.lower().endswith(".txt"):
                fmt = "icot"
            elif _custom_fields(opts):
                fmt = "generic"
        spec = parse_split(split, source) if split is not None else None
        rows = _local_rows(path, fmt, spec[0] if spec else split, source)
        if spec is not None:
            rows = _sliced(rows, spec, source)
        hint = "a file"
    else:
        if _looks_like_path(str(path_or_id)):
            raise DataError(
                f"{path_or_id}: file not found (expected an existing local file, or a hub id like 'openai/gsm8k')"
            )
        source = str(path_or_id) + (f":{hub_config}" if hub_config else "") + (f"[{split}]" if split else "")
        if fmt == "auto":
            fmt = "generic" if _custom_fields(opts) else (_hub_format(str(path_or_id)) or "auto")
        rows = _hub_rows(str(path_or_id), hub_config, split, source)
        hint = "a hub dataset"

    examples: list[Example] = []
    skipped: dict[str, int] = {}
    first_bad: int | None = None
    n_rows = 0
    for n, row in rows:
        n_rows += 1
        try:
            if isinstance(row, _RowError):
                raise row
            if fmt == "auto":
                guessed = _format_from_row(row, opts)
                if guessed is None:
                    fields = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                    raise DataError(
                        f"{source}:{n}: cannot guess the format from fields [{fields}] "
                        f"(expected the fields of one of {', '.join(FORMATS)}; pass format=..., or --format in kava eval)"
                    )
                fmt = guessed
            examples.append(_PARSERS[fmt](row, opts))
        except _RowError as e:
            if not skip_bad_rows:
                raise DataError(f"{source}:{n}: {e.message}") from None
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            first_bad = n if first_bad is None else first_bad
    if n_rows == 0:
        raise DataError(f"{source}:1: no rows (empty {hint}; expected at least one example)")
    if not examples:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
        raise DataError(f"{source}:{first_bad}: no usable rows, all {n_rows} were malformed ({detail})")
    return LoadResult(examples=examples, skipped=skipped, source=source, format=fmt)


def _looks_like_path(s: str) -> bool:
    """A string that cannot be a hub id (``owner/name`` or ``name``) is reported as a missing file."""
    if s.startswith((".", "/", "~")) or "\\" in s or s.count("/") > 1:
        return True
    return bool(re.search(r"\.(jsonl|json|csv|tsv|parquet|txt)$", s, re.I))


def default_data_dir() -> Path | None:
    """``$KAVA_DATA_DIR``, else ``<repo>/../shared/data`` when it exists, else ``None``."""
    env = os.environ.get("KAVA_DATA_DIR")
    if env:
        return Path(env)
    cand = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return cand if cand.is_dir() else None


def resolve_benchmark(name: str, local_dir: str | Path | None = None) -> tuple[str, str, str | None, str | None]:
    """Short benchmark name -> ``(path_or_id, format, split, hub_config)``.

    Prefers the local file in ``local_dir`` (default :func:`default_data_dir`)
    when it exists; otherwise the hub id with its config and split. A benchmark's hub id
    (``openai/gsm8k``, any case) names that hub dataset: it resolves to the hub id with the
    benchmark's config and split, which the hub needs (``openai/gsm8k`` has two configs, SVAMP and
    MultiArith two splits), never to the local file.
    """
    for short, (hub_id, config, split, _) in BENCHMARKS.items():
        if name.strip().lower() == hub_id.lower():
            return hub_id, short, split, config
    key = name.strip().lower().replace("_", "-")
    key = {"gsmhard": "gsm-hard", "gsm8k-test": "gsm8k"}.get(key, key)
    if key not in BENCHMARKS:
        raise DataError(f"{name}: unknown benchmark (expected one of {', '.join(BENCHMARKS)})")
    hub_id, config, split, fname = BENCHMARKS[key]
    d = Path(local_dir) if local_dir is not None else default_data_dir()
    if fname is not None and d is not None and (d / fname).is_file():
        return str(d / fname), key, None, None
    return hub_id, key, split, config


def load_benchmark(name: str, local_dir: str | Path | None = None, **kw: Any) -> LoadResult:
    """:func:`resolve_benchmark` then :func:`load_examples`."""
    path, fmt, split, config = resolve_benchmark(name, local_dir)
    return load_examples(path, format=fmt, split=split, hub_config=config, **kw)

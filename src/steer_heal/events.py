"""The events.jsonl contract: one writer (`Events.emit`), one reader (`read`).

Each line is one JSON object with at least:
  schema  "MAJOR.MINOR" of this contract (readers reject an unknown MAJOR)
  ts      UTC ISO-8601 time of the record
  stage   config | extract | isokl | generate | filter | calibrate | heal_step | heal | bake | eval |
          collapse | null | round | stop | resume | summary
  round   round index (-1 for the base model and run-level records)
plus stage-specific fields. Non-finite floats (NaN, inf) are written as null.
`eval` records carry `model` = base | steered | healed (and, from 1.2, `ref_nll`); `collapse` records
(schema 1.1+) carry `model` = base (round -1) | healed; the `null` record (1.2+, round 0) holds the
random-direction shifts a verdict compares against, and `round` records (1.2+) carry 95 % intervals.
From 1.3, `eval` records carry the calibrated trait (`<trait>_cal`, `<f>_prior_nats`, `prior_logp`), `round`
records the calibrated and discriminative shifts (`dtrait_cal_*`, `dtrait_disc_*`) with intervals and the
base model's item discrimination of the target (`separation_base`), and the
`null` record is measured on a vignette subset (`vignette_ids`) with shifts of all three kinds and their ranges.

The file is append-only. A resumed run does not rewrite it: it appends a `resume` record whose
`round` is the round it restarts at, which supersedes every earlier record of that round or later
(the unfinished round's partial records) and every earlier `stop` and `summary`. `read` returns this
live view; `read(..., raw=True)` returns every line as written. Look records up with `find` / `first`.

A crash can only tear the last line (each record is one write ending in its newline), so that is the one
unreadable line `read` skips. The writer cuts such a fragment off before it appends (a resume does so before
any work), so it never ends up mid-file; any other unreadable line is an error naming the file and line.
"""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path

from loguru import logger

from steer_heal.errors import UserError

ENVELOPE = ("schema", "ts", "stage")  # what `emit` adds to every record besides its round
SCHEMA = "1.3"  # 1.1: `collapse`, `isokl`, heal safety counts; 1.2: `null`, intervals, ref_nll; 1.3: cal, disc
STAGES = (
    "config",
    "extract",
    "isokl",
    "generate",
    "filter",
    "calibrate",
    "heal_step",
    "heal",
    "bake",
    "eval",
    "collapse",
    "null",
    "round",
    "stop",
    "resume",
    "summary",
)


def finite(x):
    """JSON-safe copy: NaN/inf -> None, tensors/numpy scalars -> Python numbers, tuples -> lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return finite(x.item())
    if isinstance(x, Path):
        return str(x)
    return x


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def ends_mid_line(path: Path) -> bool:
    """Whether a file's last byte is not a newline (a write torn by a crash or a full disk)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def torn_tail(path: Path) -> int | None:
    """The byte offset where a record torn by a crash begins: a last line without its newline that is not a
    whole JSON object. None when the file ends cleanly (or with a whole record that only lacks its newline)."""
    if not ends_mid_line(path):
        return None
    data = Path(path).read_bytes()
    cut = data.rfind(b"\n") + 1
    try:
        whole = isinstance(json.loads(data[cut:]), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        whole = False
    return None if whole else cut


def cut_torn_tail(path: Path) -> bytes:
    """Remove a record torn by a crash from the end of the file; returns what was removed (b"" if nothing).
    Truncating is one system call, and what it removes was never a record, so no reader loses anything."""
    cut = torn_tail(path)
    if cut is None:
        return b""
    with Path(path).open("r+b") as f:
        f.seek(cut)
        frag = f.read()
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    return frag


class Events:
    """Append-only writer. Each record is one write of one line + fsync, so a crash leaves whole lines and at
    most a torn last one; that fragment (a kill or a full disk mid-line) is cut off before the next record is
    appended, so it can never end up mid-file, where a reader could not tell it from corruption."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def emit(self, stage: str, round: int, **fields) -> dict:
        if stage not in STAGES:
            raise ValueError(f"unknown event stage {stage!r}; valid: {STAGES}")
        rec = {"schema": SCHEMA, "ts": now(), "stage": stage, "round": int(round), **finite(fields)}
        line = json.dumps(rec, allow_nan=False, ensure_ascii=False) + "\n"
        if frag := cut_torn_tail(self.path):
            logger.warning(f"{self.path}: removed a record torn by a crash ({len(frag)} bytes: {frag[:60]!r})")
        if ends_mid_line(self.path):  # a whole record without its newline: keep it, start on a fresh line
            line = "\n" + line
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return rec


def find(recs: list[dict], stage: str, **match) -> list[dict]:
    """The records of `stage` whose fields equal every `match` value, in order."""
    return [r for r in recs if r.get("stage") == stage and all(r.get(k) == v for k, v in match.items())]


def first(recs: list[dict], stage: str, **match) -> dict | None:
    """The first record of `stage` matching every `match` value, or None."""
    return next(iter(find(recs, stage, **match)), None)


def last(recs: list[dict], stage: str, **match) -> dict | None:
    """The last record of `stage` matching every `match` value, or None."""
    found = find(recs, stage, **match)
    return found[-1] if found else None


def live(recs: list[dict]) -> list[dict]:
    """Apply `resume` markers: each drops the earlier records of its round and later, and earlier stops
    and summaries (they belonged to an attempt that is being continued)."""
    out: list[dict] = []
    for r in recs:
        if r.get("stage") == "resume":
            out = [x for x in out if x["round"] < r["round"] and x.get("stage") not in ("stop", "summary")]
        out.append(r)
    return out


def _torn(i: int, lines: list[str], text: str, line: str) -> bool:
    """Whether unreadable line i is a record torn by a crash: the last line, cut before its newline, or a
    fragment an older writer (which did not cut torn tails) left mid-file when it began a record afresh."""
    last = i == len(lines) and not text.endswith("\n")
    return last or line.startswith('{"schema": "')


def read(path: Path, stage: str | None = None, raw: bool = False) -> list[dict]:
    """All live records (or one stage's) in order; `raw` = every line as written, superseded ones too.
    A record torn by a crash (a last line without its newline) is skipped; any other unreadable line is an
    error naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / "events.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no events.jsonl here; is this a steer_heal run directory?")
    out = []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if _torn(i, lines, text, line):
                continue
            raise UserError(
                f"{path}:{i}: corrupt event line ({e.msg}); only a record torn by a crash (the last line, cut "
                "short) is skipped: repair or delete this line"
            ) from e
        major = str(rec.get("schema", "")).split(".")[0]
        if major != SCHEMA.split(".")[0]:
            raise UserError(
                f"{path}:{i}: events schema {rec.get('schema')!r} is not readable by this version (reads {SCHEMA})"
            )
        out.append(rec)
    out = out if raw else live(out)
    return [r for r in out if stage is None or r.get("stage") == stage]

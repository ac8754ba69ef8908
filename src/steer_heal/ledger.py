"""The results ledger: one JSON line per run in <out-dir>/results.jsonl, read by scripts/results.py.

Rows are keyed by run name: a resumed run appends a newer row for the same run, and `read` keeps the
last row of each run, so no run is counted twice. Columns may change between versions; old rows still
read back. A torn line (a crash mid-append) is skipped with a warning instead of breaking the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loguru import logger

from steer_heal.events import finite
from steer_heal.records import RunInfo, isfinite


def row(info: RunInfo, verdict_line: str) -> dict:
    rounds, c = info.rounds, info.config
    heal = c.get("heal", {})
    last = rounds[-1] if rounds else None
    ok = [r for r in rounds if isfinite(r.healed_coh) and r.healed_coh >= info.coh_floor and isfinite(r.dtrait_healed)]
    best = max(ok, key=lambda r: info.sign * r.dtrait_healed) if ok else None
    base = info.base or {}

    def of(r, key):  # a field of a round that may not exist
        return getattr(r, key) if r is not None else None

    return {
        "run": info.root.name,
        "commit": info.meta.get("git_commit"),
        "argv": info.meta.get("argv"),
        "preset": c.get("preset"),
        "model": c.get("model"),
        "reg": heal.get("reg"),
        "lam": heal.get("lam"),
        "tau": heal.get("tau"),
        "kl_agg": heal.get("kl_agg"),
        "barrier_ref": heal.get("barrier_ref"),
        "seed": c.get("seed"),
        "trait_key": info.trait_key,
        "base_trait": base.get(info.trait_key),
        "base_coh": base.get("coherence"),
        "n_rounds_done": len(rounds),
        "final_dtrait": of(last, "dtrait_healed"),
        "final_coh": of(last, "healed_coh"),
        "final_retain": of(last, "retain"),
        "best_round": of(best, "round"),
        "best_dtrait": of(best, "dtrait_healed"),
        "best_coh": of(best, "healed_coh"),
        "verdict": verdict_line,
        "stop": (info.stop or {}).get("reason"),
    }


def append(path: Path, rec: dict) -> None:
    """Append one line in a single write + fsync. If the file ends mid-line (an earlier torn append),
    start on a fresh line so the torn row stays alone and this one reads back whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(finite(rec), ensure_ascii=False, allow_nan=False) + "\n"
    with path.open("ab") as f:
        if f.tell() > 0:
            with path.open("rb") as g:
                g.seek(-1, os.SEEK_END)
                if g.read(1) != b"\n":
                    line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def read(path: Path) -> list[dict]:
    """The newest row of each run, in order of first appearance; torn lines skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    by_run: dict[str, dict] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logger.warning(f"{path}:{i}: skipping a torn ledger line ({line[:60]!r})")
            continue
        if isinstance(rec, dict):
            by_run[str(rec.get("run", f"<line {i}>"))] = rec
    return list(by_run.values())

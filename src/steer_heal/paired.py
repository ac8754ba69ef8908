"""What the run-reading diagnostic scripts share: reopen a run directory as a Session, and build paired
rows (every arm scored on the same vignettes as the base row, deltas against that base row).

    rd, meta, s = open_run("out/<run>", n_vignettes=70)
    base, _ = s.evaluate(desc="eval base")
    rows = [row("base", base, base, tk), row("steered c=2", m, base, tk)]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tabulate import tabulate

from steer_heal.config import from_dict
from steer_heal.errors import UserError
from steer_heal.report import deltas
from steer_heal.rundir import RunDir, atomic_write_json, load_tensors
from steer_heal.session import Session


def open_run(
    run_dir: str | Path, eval_vignettes: str | None = None, n_vignettes: int | None = None
) -> tuple[RunDir, dict, Session]:
    """The run's stored config as a Session (model, data, band), optionally on other vignettes."""
    rd = RunDir(Path(run_dir))
    meta = rd.read_config()
    cfg = from_dict(meta["config"])
    ev = cfg.eval
    if eval_vignettes is not None or n_vignettes is not None:
        ev = dataclasses.replace(
            ev,
            eval_vignettes=eval_vignettes if eval_vignettes is not None else ev.eval_vignettes,
            n_vignettes=n_vignettes if n_vignettes is not None else ev.n_vignettes,
        )
    return rd, meta, Session.from_config(dataclasses.replace(cfg, eval=ev))


def teacher(rd: RunDir, r: int) -> dict[int, torch.Tensor]:
    """The teacher vector the run saved in round r."""
    path = rd.vector(r)
    if not path.is_file():
        raise UserError(f"{rd.root}: no teacher vector for round {r} ({path}); rounds done: {rd.completed_rounds()}")
    return {int(k): v for k, v in load_tensors(path).items()}


def row(arm: str, m: dict, base: dict, tk: str, steered: dict | None = None, **extra) -> dict:
    """One paired row: trait and coherence, their deltas vs base, slope, and retain when `steered` is given."""
    d = deltas(base, None, m, tk)
    out = {
        "arm": arm,
        tk: m[tk],
        "coherence": m["coherence"],
        "dTrait": d["dtrait_healed"],
        "dCoh": d["dcoh_healed"],
        "slope": d["slope_healed"],
    }
    if steered is not None:
        out["retain"] = deltas(base, steered, m, tk)["retain"]
    return out | extra


def table(rows: list[dict], cols: list[str]) -> str:
    show = [[("" if r.get(c) is None else r.get(c)) for c in cols] for r in rows]
    return tabulate(show, headers=cols, floatfmt=".3f", tablefmt="github")


def healed_rows(rd: RunDir, s: Session, base: dict, tk: str, steered: dict | None) -> list[dict]:
    """The student after each completed round (adapters re-attached in order), unsteered, paired with base."""
    rows = []
    for r in rd.completed_rounds():
        s.student.load_adapter(r, rd.adapter(r))
        m, _ = s.evaluate(desc=f"eval healed r{r}")
        rows.append(row(f"healed r{r}", m, base, tk, steered=steered, stage="healed", round=r))
    return rows


def report(rows: list[dict], tk: str, rd: RunDir, s: Session, out: Path | None) -> None:
    """Print the paired table and, with `out`, write the rows as JSON."""
    print(table(rows, ["arm", tk, "coherence", "dTrait", "dCoh", "slope", "retain"]))
    if out:
        atomic_write_json(
            out, {"run": rd.root.name, "trait_key": tk, "vignettes": s.vig_source, "n": len(s.vigs), "rows": rows}
        )
        print(f"wrote {out}")

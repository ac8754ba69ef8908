"""What the run-reading diagnostic scripts share: reopen a run directory as a Session, and build paired
rows (every arm scored on the same vignettes as the base row, deltas against that base row).

    run = open_run("out/<run>", n_vignettes=70)        # run.rd, run.info, run.s (the Session)
    base, _ = run.s.evaluate(desc="eval base")
    rows = [row("base", base, base, tk), row("steered c=2", m, base, tk)]
    report(rows, run, out)                               # prints the table, writes JSON atomically
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from steer_heal.config import from_dict
from steer_heal.data import read_jsonl
from steer_heal.errors import UserError
from steer_heal.records import RunInfo, deltas
from steer_heal.rundir import RunDir, atomic_write_json
from steer_heal.session import Session

PAIRED_COLS = ["arm", "coherence", "dTrait", "dCoh", "slope", "retain"]


@dataclass
class OpenRun:
    rd: RunDir
    info: RunInfo
    s: Session

    @property
    def trait_key(self) -> str:
        return self.info.trait_key

    def require_rounds(self) -> list[int]:
        """The completed rounds; a UserError naming the directory when there are none."""
        done = self.rd.completed_rounds()
        if not done:
            raise UserError(
                f"{self.rd.root}: no completed round to score (no rounds/r*/DONE); let the run finish a round, "
                f"or continue it with python -m steer_heal.run --resume {self.rd.root}"
            )
        return done

    def steered_c(self, r: int = 0) -> float:
        """The strength the run evaluated round r's steered model at."""
        ev = self.info.steered_eval(r)
        if ev is None:
            raise UserError(f"{self.rd.root}: no steered eval recorded for round {r}")
        return ev["c"]

    def kept_pairs(self, r: int) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, completion ids) of the completions the run kept in round r (its heal data)."""
        path = self.rd.completions(r)
        if not path.is_file():
            raise UserError(f"{self.rd.root}: round {r} has no completions.jsonl ({path})")
        return [(x["prompt_ids"], x["ids"]) for x in read_jsonl(path) if x["keep"]]


def open_run(run_dir: str | Path, eval_vignettes: str | None = None, n_vignettes: int | None = None) -> OpenRun:
    """The run's stored config as a Session (model, data, band), optionally on other vignettes."""
    rd = RunDir(Path(run_dir))
    info = RunInfo.read(rd.root)
    cfg = from_dict(rd.read_config()["config"])
    ev = cfg.eval
    if eval_vignettes is not None or n_vignettes is not None:
        ev = dataclasses.replace(
            ev,
            eval_vignettes=eval_vignettes if eval_vignettes is not None else ev.eval_vignettes,
            n_vignettes=n_vignettes if n_vignettes is not None else ev.n_vignettes,
        )
    return OpenRun(rd=rd, info=info, s=Session.from_config(dataclasses.replace(cfg, eval=ev)))


def row(arm: str, m: dict, base: dict, tk: str, steered: dict | None = None, **extra) -> dict:
    """One paired row: trait and coherence, their deltas vs base, slope, and retain when `steered` is given."""
    d = deltas(base, steered, m, tk)
    out = {
        "arm": arm,
        tk: m[tk],
        "coherence": m["coherence"],
        "dTrait": d["dtrait_healed"],
        "dCoh": d["dcoh_healed"],
        "slope": d["slope_healed"],
    }
    if steered is not None:
        out["retain"] = d["retain"]
    return out | extra


def table(rows: list[dict], cols: list[str]) -> str:
    show = [[("" if r.get(c) is None else r.get(c)) for c in cols] for r in rows]
    return tabulate(show, headers=cols, floatfmt=".3f", tablefmt="github")


def healed_rows(run: OpenRun, base: dict, steered: dict | None) -> list[dict]:
    """The student after each completed round (adapters re-attached in order), unsteered, paired with base."""
    rows, tk = [], run.trait_key
    for r in run.require_rounds():
        run.s.student.load_adapter(r, run.rd.adapter(r))
        m, _ = run.s.evaluate(desc=f"eval healed r{r}")
        rows.append(row(f"healed r{r}", m, base, tk, steered=steered, stage="healed", round=r))
    return rows


def report(rows: list[dict], run: OpenRun, out: Path | None, cols: list[str] | None = None, **meta) -> None:
    """Print the paired table and, with `out`, write the rows (and `meta`) as JSON."""
    tk = run.trait_key
    print(table(rows, cols or [PAIRED_COLS[0], tk, *PAIRED_COLS[1:]]))
    if out:
        s = run.s
        doc = {"run": run.rd.root.name, "trait_key": tk, "vignettes": s.vig_source, "n": len(s.vigs), **meta}
        atomic_write_json(out, doc | {"rows": rows})
        print(f"wrote {out}")

"""What the run-reading diagnostic scripts share: reopen a run directory as a Session, and build paired
rows (every arm scored on the same vignettes as the base row, deltas against that base row, each with
a paired-bootstrap 95 % interval over the vignettes).

    run = open_run("out/<run>", n_vignettes=70)        # run.rd, run.info, run.s (the Session)
    base = run.s.evaluate(desc="eval base")
    rows = [row("base", base, base, run), row("steered c=2", run.s.evaluate(v, 2.0), base, run)]
    report(rows, run, out)                               # prints the table, writes JSON atomically
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from loguru import logger
from tabulate import tabulate

from steer_heal import seeds, stats
from steer_heal.config import from_dict
from steer_heal.data import read_jsonl
from steer_heal.errors import UserError
from steer_heal.evaluate import Scored
from steer_heal.records import RunInfo, deltas
from steer_heal.rundir import RunDir, atomic_write_json
from steer_heal.session import Session

PAIRED_COLS = ["arm", "coherence", "ref_nll", "dTrait", "dTrait_cal", "dTrait_disc", "dCoh", "slope", "retain",
               "anti_steerable"]  # fmt: skip
CI_KEYS = ("dTrait", "dTrait_cal", "dTrait_disc", "dCoh", "retain", "specificity")  # est with _lo / _hi


@dataclass
class OpenRun:
    rd: RunDir
    info: RunInfo
    s: Session

    @property
    def trait_key(self) -> str:
        return self.info.trait_key

    @property
    def target(self) -> str:
        """The foundation the persona is expected to move (e.g. Authority)."""
        return self.s.persona.trait

    @cached_property
    def idx(self) -> np.ndarray:
        """The bootstrap resamples of the vignettes, shared by every row (so the rows are paired)."""
        return self.s.resamples()

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

    def kept(self, r: int) -> list[dict]:
        """The completions the run kept in round r (its heal data, in the run's order)."""
        path = self.rd.completions(r)
        if not path.is_file():
            raise UserError(f"{self.rd.root}: round {r} has no completions.jsonl ({path})")
        return [x for x in read_jsonl(path) if x["keep"]]

    def kept_pairs(self, r: int) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, completion ids) of the kept completions of round r."""
        return [(x["prompt_ids"], x["ids"]) for x in self.kept(r)]

    def kept_coeffs(self, r: int) -> list[float]:
        """The strength each kept completion of round r was generated at (its teacher's strength)."""
        return [x["coeff"] for x in self.kept(r)]


def open_run(run_dir: str | Path, eval_vignettes: str | None = None, n_vignettes: int | None = None) -> OpenRun:
    """The run's stored config as a Session (model, data, band), optionally on other vignettes."""
    rd = RunDir(Path(run_dir))
    info = RunInfo.read(rd.root)
    meta = rd.read_config()
    cfg = from_dict(meta["config"])
    if meta.get("seed_scheme", seeds.LEGACY) != seeds.SCHEME:
        logger.warning(
            f"{rd.root}: seeded by the {meta.get('seed_scheme', seeds.LEGACY)!r} scheme (before 2026-12-08); what this "
            f"script draws anew (a null it did not save, --fresh arms) is seeded by {seeds.SCHEME!r}"
        )
    ev = cfg.eval
    if eval_vignettes is not None or n_vignettes is not None:
        ev = dataclasses.replace(
            ev,
            eval_vignettes=eval_vignettes if eval_vignettes is not None else ev.eval_vignettes,
            n_vignettes=n_vignettes if n_vignettes is not None else ev.n_vignettes,
        )
    return OpenRun(rd=rd, info=info, s=Session.from_config(dataclasses.replace(cfg, eval=ev)))


def row(arm: str, ev: Scored, base: Scored, run: OpenRun, steered: Scored | None = None, **extra) -> dict:
    """One paired row: trait, coherence and ref_nll; dTrait, dTrait_cal, dTrait_disc, dCoh (and retain against
    `steered`) with 95 % intervals; slope; how surgical (specificity) and how many vignettes moved the wrong
    way. An arm with no per-vignette rows (a mean of arms) gets the point estimates only."""
    tk, sign = run.trait_key, run.s.persona.sign
    d = deltas(base.m, steered.m if steered else None, ev.m, tk)
    out = {"arm": arm, tk: ev.m[tk], "coherence": ev.m["coherence"], "ref_nll": ev.m.get("ref_nll"),
           "dTrait": d["dtrait_healed"], "dCoh": d["dcoh_healed"], "slope": d["slope_healed"]}  # fmt: skip
    if steered is not None:
        out["retain"] = d["retain"]
    if ev.rows is not None:
        ci = stats.paired_deltas(ev.arm, base.arm, run.target, run.idx, steered.arm if steered else None)
        ci["specificity"] = stats.specificity(ev.arm, base.arm, run.target, sign, run.idx)
        out["anti_steerable"] = stats.anti_steerable(ev.arm, base.arm, run.target, sign)
        for k in CI_KEYS:
            if ci.get(k) and (k in out or k in ("specificity", "dTrait_cal", "dTrait_disc")):
                # the point estimates stay records.deltas' (blank below 0.05 nats); the intervals are stats'
                out |= {**stats.flat(k, ci[k]), k: out.get(k, ci[k]["est"])}
    return out | extra


def cell(r: dict, c: str):
    """A table cell: an estimate with its interval when the row has one."""
    x = r.get(c)
    if x is None:
        return ""
    if isinstance(x, float) and r.get(f"{c}_lo") is not None:
        return stats.Estimate(x, r[f"{c}_lo"], r[f"{c}_hi"]).text("+.3f" if c != "retain" else ".2f")
    return x


def table(rows: list[dict], cols: list[str]) -> str:
    show = [[cell(r, c) for c in cols] for r in rows]
    heads = [f"{c} [95% CI]" if any(r.get(f"{c}_lo") is not None for r in rows) else c for c in cols]
    return tabulate(show, headers=heads, floatfmt=".3f", tablefmt="github")


def healed_rows(run: OpenRun, base: Scored, steered: Scored | None) -> list[dict]:
    """The student after each completed round (adapters re-attached in order), unsteered, paired with base."""
    rows = []
    for r in run.require_rounds():
        run.s.student.load_adapter(r, run.rd.adapter(r))
        ev = run.s.evaluate(desc=f"eval healed r{r}")
        rows.append(row(f"healed r{r}", ev, base, run, steered=steered, stage="healed", round=r))
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

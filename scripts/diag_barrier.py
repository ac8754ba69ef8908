"""Barrier sweep (Q1): re-heal one round's kept completions under a grid of barrier settings.

    uv run python scripts/diag_barrier.py out/<run> [--round 0] [--regs nll kl_rev] [--lams 0.1 0.3 1]
        [--taus 0.5] [--aggs rmse] [--wds 0] [--targets sft kl_teacher mix] [--out barrier.json]

Every arm starts from the same student (the run's adapters before --round re-attached) and the same
init seed, trains a fresh adapter on exactly the completions the run kept in that round (under each
--targets heal target: the kl_teacher / mix teacher is the round's saved vector at each completion's
own strength), and is scored on the run's vignettes. Base and steered rows are the run's own (same
vignettes), so all rows are paired. The table is sorted by slope = 100 * dCoh / dTrait (coherence points lost per nat of
trait moved; blank when |dTrait| < 0.05 nats).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from pathlib import Path

from steer_heal import paired
from steer_heal.cli import ArgumentParser, cli, nonneg_float, nonneg_int
from steer_heal.data import read_jsonl
from steer_heal.errors import UserError
from steer_heal.evaluate import Scored
from steer_heal.heal import SteeredTeacher, heal


def arms(regs, lams, taus, aggs, wds, targets=("sft",)) -> list[dict]:
    """The grid; `nll` has no barrier, so it gets one arm per weight decay (and heal target)."""
    out = []
    for target, reg, wd in itertools.product(targets, regs, wds):
        if reg == "nll":
            out.append({"heal_target": target, "reg": reg, "lam": 0.0, "tau": 0.0, "kl_agg": "-", "weight_decay": wd})
            continue
        for lam, tau, agg in itertools.product(lams, taus, aggs):
            out.append({"heal_target": target, "reg": reg, "lam": lam, "tau": tau, "kl_agg": agg, "weight_decay": wd})
    return out


def arm_name(arm: dict) -> str:
    name = arm["reg"] if arm["reg"] == "nll" else f"{arm['reg']} lam={arm['lam']:g} tau={arm['tau']:g} {arm['kl_agg']}"
    name = (f"{arm['heal_target']} " if arm["heal_target"] != "sft" else "") + name
    return name + (f" wd={arm['weight_decay']:g}" if arm["weight_decay"] else "")


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--round", type=nonneg_int, default=0)
    ap.add_argument("--regs", nargs="+", default=["nll", "kl_rev"], choices=["nll", "kl_rev", "kl_fwd"])
    ap.add_argument("--lams", nargs="+", type=nonneg_float, default=[0.1, 0.3, 1.0])
    ap.add_argument("--taus", nargs="+", type=nonneg_float, default=[0.5])
    ap.add_argument("--aggs", nargs="+", default=["rmse"], choices=["mean", "rmse", "p95", "max"])
    ap.add_argument("--wds", nargs="+", type=nonneg_float, default=[0.0])
    ap.add_argument("--targets", nargs="+", default=["sft"], choices=["sft", "kl_teacher", "mix"], help="heal targets")
    ap.add_argument("--out", type=Path, help="write rows as JSON here")
    a = ap.parse_args(argv)
    run = paired.open_run(a.run_dir)
    info, tk, cfg = run.info, run.trait_key, run.s.cfg
    steered = info.steered_eval(a.round)
    if info.base is None or steered is None:
        rounds = sorted({x["round"] for x in info.filters})
        raise UserError(f"{run.rd.root}: no base and steered eval for round {a.round}; rounds with data: {rounds}")
    pairs = run.kept_pairs(a.round)
    for r in range(a.round):
        run.s.student.load_adapter(r, run.rd.adapter(r))
    base = Scored(info.base, read_jsonl(run.rd.eval_rows(-1, "base")))
    steered = Scored(steered, read_jsonl(run.rd.eval_rows(a.round, "steered")))
    rows = [paired.row("base", base, base, run), paired.row(f"steered c={steered.m['c']:g}", steered, base, run)]
    grid = arms(a.regs, a.lams, a.taus, a.aggs, a.wds, a.targets)
    teacher = SteeredTeacher(run.rd.vectors(a.round), run.kept_coeffs(a.round))
    print(
        f"{len(grid)} arms on {len(pairs)} kept completions of round {a.round} of {run.rd.root.name}", file=sys.stderr
    )
    for arm in grid:
        fields = dict(arm, kl_agg=cfg.heal.kl_agg) if arm["reg"] == "nll" else arm
        hc = dataclasses.replace(cfg.heal, **fields)
        t0 = time.perf_counter()
        res = heal(run.s.student, pairs, hc, a.round, cfg.seed, run.s.tok.pad_token_id, teacher=teacher)
        heal_s = time.perf_counter() - t0  # the heal alone: what a target costs per round (teacher passes included)
        ev = run.s.evaluate(desc=f"eval {arm_name(arm)}")
        run.s.student.drop_training()
        extra = {"fired": res.fired_frac, "nll": res.nll_last, "D": res.d_mean, "steps": res.steps, "heal_s": heal_s}
        extra |= {"seconds": time.perf_counter() - t0, **arm}
        rows.append(paired.row(arm_name(arm), ev, base, run, steered=steered, **extra))
    healed = sorted(rows[2:], key=lambda r: (r["slope"] is None, r["slope"] if r["slope"] is not None else 0))
    cols = ["arm", tk, "coherence", "dTrait", "dCoh", "slope", "retain", "fired", "D", "steps", "heal_s"]
    paired.report(rows[:2] + healed, run, a.out, cols, round=a.round)
    return 0


if __name__ == "__main__":
    cli(main)

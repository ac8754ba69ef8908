"""Barrier sweep (Q1): re-heal one round's kept completions under a grid of barrier settings.

    uv run python scripts/diag_barrier.py out/<run> [--round 0] [--regs nll kl_rev] [--lams 0.1 0.3 1]
        [--taus 0.5] [--aggs rmse] [--wds 0] [--out barrier.json]

Every arm starts from the same student (the run's adapters before --round re-attached) and the same
init seed, trains a fresh adapter on exactly the completions the run kept in that round, and is
scored on the run's vignettes. Base and steered rows are the run's own (same vignettes), so all rows
are paired. The table is sorted by slope = 100 * dCoh / dTrait (coherence points lost per nat of
trait moved; blank when |dTrait| < 0.05 nats).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

from tabulate import tabulate

from steer_heal import events
from steer_heal.config import from_dict
from steer_heal.data import read_jsonl
from steer_heal.errors import UserError, cli
from steer_heal.heal import heal
from steer_heal.report import deltas
from steer_heal.rundir import RunDir
from steer_heal.session import Session


def arms(regs, lams, taus, aggs, wds) -> list[dict]:
    """The grid; `nll` has no barrier, so it gets one arm per weight decay."""
    out = []
    for reg, wd in itertools.product(regs, wds):
        if reg == "nll":
            out.append({"reg": reg, "lam": 0.0, "tau": 0.0, "kl_agg": "-", "weight_decay": wd})
            continue
        for lam, tau, agg in itertools.product(lams, taus, aggs):
            out.append({"reg": reg, "lam": lam, "tau": tau, "kl_agg": agg, "weight_decay": wd})
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--round", type=int, default=0)
    ap.add_argument("--regs", nargs="+", default=["nll", "kl_rev"], choices=["nll", "kl_rev", "kl_fwd"])
    ap.add_argument("--lams", nargs="+", type=float, default=[0.1, 0.3, 1.0])
    ap.add_argument("--taus", nargs="+", type=float, default=[0.5])
    ap.add_argument("--aggs", nargs="+", default=["rmse"], choices=["mean", "rmse", "p95", "max"])
    ap.add_argument("--wds", nargs="+", type=float, default=[0.0])
    ap.add_argument("--out", help="write rows as JSON here")
    a = ap.parse_args(argv)
    rd = RunDir(Path(a.run_dir))
    stored = rd.read_config()
    cfg = from_dict(stored["config"])
    tk = stored["trait_key"]
    recs = events.read(rd.events)
    base = next(x for x in recs if x["stage"] == "eval" and x.get("model") == "base")
    steered = next(
        (x for x in recs if x["stage"] == "eval" and x.get("model") == "steered" and x["round"] == a.round), None
    )
    if steered is None:
        raise UserError(
            f"{rd.root}: no steered eval for round {a.round}; rounds with data: "
            f"{sorted({x['round'] for x in recs if x['stage'] == 'filter'})}"
        )
    kept = [r for r in read_jsonl(rd.completions(a.round)) if r["keep"]]
    pairs = [(r["prompt_ids"], r["ids"]) for r in kept]
    s = Session.from_config(cfg)
    for r in range(a.round):
        s.student.load_adapter(r, rd.adapter(r))
    rows = [
        {"arm": "base", tk: base[tk], "coherence": base["coherence"]},
        {
            "arm": f"steered c={steered['c']:g}",
            tk: steered[tk],
            "coherence": steered["coherence"],
            **_d(base, steered, tk, "steered"),
        },
    ]
    grid = arms(a.regs, a.lams, a.taus, a.aggs, a.wds)
    print(f"{len(grid)} arms on {len(pairs)} kept completions of round {a.round} of {rd.root.name}", file=sys.stderr)
    for arm in grid:
        fields = dict(arm, kl_agg=cfg.heal.kl_agg) if arm["reg"] == "nll" else arm
        hc = dataclasses.replace(cfg.heal, **fields)
        t0 = time.time()
        res = heal(s.student, pairs, hc, a.round, cfg.seed, s.tok.pad_token_id, emit=lambda **kw: None)
        m, _ = s.evaluate(desc=f"eval {arm['reg']} lam={arm['lam']}")
        s.student.drop_training()
        name = (
            arm["reg"] if arm["reg"] == "nll" else f"{arm['reg']} lam={arm['lam']:g} tau={arm['tau']:g} {arm['kl_agg']}"
        )
        if arm["weight_decay"]:
            name += f" wd={arm['weight_decay']:g}"
        rows.append(
            {
                "arm": name,
                tk: m[tk],
                "coherence": m["coherence"],
                **_d(base, m, tk, "healed"),
                "retain": deltas(base, steered, m, tk)["retain"],
                "fired": res.fired_frac,
                "nll": res.nll_last,
                "D": res.d_mean,
                "seconds": time.time() - t0,
                **arm,
            }
        )
    healed = sorted(rows[2:], key=lambda r: (r["slope"] is None, r["slope"] if r["slope"] is not None else 0))
    cols = ["arm", tk, "coherence", "dTrait", "dCoh", "slope", "retain", "fired", "D"]
    show = [[("" if r.get(c) is None else r.get(c)) for c in cols] for r in rows[:2] + healed]
    print(tabulate(show, headers=cols, floatfmt=".3f", tablefmt="github"))
    if a.out:
        Path(a.out).write_text(
            json.dumps({"run": rd.root.name, "round": a.round, "trait_key": tk, "rows": rows}, indent=2)
        )
    return 0


def _d(base: dict, m: dict, tk: str, which: str) -> dict:
    d = deltas(base, m if which == "steered" else None, m if which == "healed" else None, tk)
    return {"dTrait": d[f"dtrait_{which}"], "dCoh": d[f"dcoh_{which}"], "slope": d[f"slope_{which}"]}


if __name__ == "__main__":
    cli(main)

"""Frontiers of several seeds side by side: every arm's raw, calibrated and discriminative shift, and every
healed round's advantages, as mean and 95 % t-interval across the runs (one run per seed).

    uv run python scripts/frontier_seeds.py out/<run s0> out/<run s1> out/<run s2> [--out FILE]

Reads <run>/frontier.json (scripts/diag_frontier.py) of each run. Arms are matched by name ("steer c=1",
"prompt 3", "healed r1"); null_pct / null_pct_disc = the share of the run's random directions whose raw /
discriminative shift the arm's lies beyond in the persona's direction; separation = the arm's own item
discrimination (stats.separation; dTrait_disc is its change from base's); the random directions themselves
are summarised per run by their 95 % range (2.5th and 97.5th percentile over the directions). A
t-interval over fewer than 3 runs is not a claim (flagged).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tabulate import tabulate

from steer_heal import ledger, stats
from steer_heal.cli import ArgumentParser, cli
from steer_heal.errors import UserError
from steer_heal.rundir import RunDir, atomic_write_json

SHIFTS = ("dTrait", "dTrait_cal", "dTrait_disc", "separation", "dCoh", "dPrior", "null_pct", "null_pct_disc")
TRAIT_KINDS = ("raw", "cal", "disc")


def frontier_path(run: Path) -> Path:
    path = run / "frontier.json" if run.is_dir() else run
    if not path.is_file():
        raise UserError(f"{run}: no frontier.json; run scripts/diag_frontier.py on it first")
    return path


def load(run: Path) -> dict:
    return json.loads(frontier_path(run).read_text(encoding="utf-8"))


def seed_of(path: Path, doc: dict):
    """The seed of the run a frontier.json measured: its own `seed` field, else the config.json beside it (a
    frontier written before it recorded the seed, in its run directory)."""
    if "seed" in doc:
        return doc["seed"]
    cfg = path.parent / "config.json"
    if cfg.is_file():
        return RunDir(path.parent).read_config()["config"].get("seed")
    raise UserError(f"{path}: no seed in it and no config.json beside it; pass the run directory it belongs to")


def distinct_runs(runs: list[Path]) -> None:
    """Refuse a run given twice or two runs of one seed: the t-interval is across seeds, n must count seeds."""
    paths = [frontier_path(r).resolve() for r in runs]
    if len(set(paths)) < len(paths):
        again = next(str(r) for r, p in zip(runs, paths) if paths.count(p) > 1)
        raise UserError(f"{again} is given more than once; give each run (one per seed) once")
    seeds = [(str(r), seed_of(p, json.loads(p.read_text(encoding="utf-8")))) for r, p in zip(runs, paths)]
    ledger.one_run_per_seed(seeds, "frontier_seeds", "give one run of each seed")


def cell(t: dict, spec: str = "+.3f") -> str:
    """'-0.548 [-0.773, -0.323]' (mean and 95 % t-interval), the mean alone for one run."""
    return stats.Estimate.of(t).text(spec)


def arm_table(docs: list[dict]) -> list[dict]:
    """Per non-random arm (in the first run's order): each shift's t-interval across the runs."""
    out = []
    for name in [r["arm"] for r in docs[0]["rows"] if r["kind"] != "random"]:
        rows = [next((r for r in d["rows"] if r["arm"] == name), None) for d in docs]
        rows = [r for r in rows if r is not None]
        out.append({"arm": name, "n": len(rows), **{k: stats.t_interval([r.get(k) for r in rows]) for k in SHIFTS}})
    return out


def null_table(docs: list[dict]) -> list[dict]:
    """Per run: the random directions' 95 % range of each trait kind, and how many directions there were."""
    out = []
    for d in docs:
        rand = [r for r in d["rows"] if r["kind"] == "random"]
        rec = {"run": d["run"], "directions": len(rand), "vignettes": rand[0].get("n_vignettes") if rand else None}
        for k in ("dTrait", "dTrait_cal", "dTrait_disc"):
            xs = np.array([r[k] for r in rand if r.get(k) is not None])
            rec[k] = f"[{np.quantile(xs, 0.025):+.3f}, {np.quantile(xs, 0.975):+.3f}]" if xs.size else ""
        out.append(rec)
    return out


def advantage_table(docs: list[dict]) -> list[dict]:
    """Per healed round, trait kind and axis: A_steer and A_prompt across the runs."""
    out, by_trait = [], [ledger.advantages_by_trait(d) for d in docs]
    rounds = sorted({a["round"] for b in by_trait for axes in b.values() for adv in axes.values() for a in adv})
    for r in rounds:
        for kind in TRAIT_KINDS:
            for axis in ("coherence", "ref_nll"):
                rec = {"round": r, "trait": kind, "axis": axis}
                for k in ("steer", "prompt"):
                    found = [next((a for a in (b.get(kind) or {}).get(axis) or [] if a["round"] == r), None)
                             for b in by_trait]  # fmt: skip
                    rec[f"A_{k}"] = stats.t_interval([(a.get(k) or {}).get("est") if a else None for a in found])
                out.append(rec)
    return out


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("runs", type=Path, nargs="+", help="run directories (or frontier.json files), one per seed")
    ap.add_argument("--out", type=Path, help="write the tables as JSON here")
    a = ap.parse_args(argv)
    distinct_runs(a.runs)
    docs = [load(r) for r in a.runs]
    keys = {(d["trait_key"], d["n"]) for d in docs}
    if len(keys) > 1:
        raise UserError(f"the runs' frontiers differ in trait or vignette count: {sorted(keys)}")
    arms, null, adv = arm_table(docs), null_table(docs), advantage_table(docs)
    tk = docs[0]["trait_key"]
    names = ", ".join(d["run"] for d in docs)
    print(f"{len(docs)} runs: {names}; {tk}, {docs[0]['n']} vignettes; mean [95% t-interval]\n")
    print(tabulate([{"arm": x["arm"], "n": x["n"], **{k: cell(x[k]) for k in SHIFTS}} for x in arms],
                   headers="keys", tablefmt="github"))  # fmt: skip
    print("\nrandom null per run (95% range over the directions):")
    print(tabulate(null, headers="keys", tablefmt="github"))
    print("\nadvantages per healed round (nats beyond the curve at matched coherence / capability tax):")
    print(tabulate([{**{k: x[k] for k in ("round", "trait", "axis")}, "A_steer": cell(x["A_steer"]),
                     "A_prompt": cell(x["A_prompt"])} for x in adv], headers="keys", tablefmt="github"))  # fmt: skip
    if len(docs) < 3:
        print(f"\nn = {len(docs)} < 3 runs: the intervals are not a claim")
    if a.out:
        atomic_write_json(a.out, {"runs": [d["run"] for d in docs], "arms": arms, "null": null, "advantage": adv})
    return 0


if __name__ == "__main__":
    cli(main)

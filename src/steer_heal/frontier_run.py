"""The frontier of one run: does steer -> distil -> heal put more trait into the weights than steering at a
lower dose, or than asking for the persona in the system prompt, at matched coherence? With 95 % intervals.

    uv run python -m steer_heal.frontier_run out/<run> [--cs 0 0.5 1 1.5 2 2.5 3] [--n-null 8]
        [--ladder FILE] [--x coherence|ref_nll] [--n-vignettes N] [--eval-vignettes PATH] [--out FILE]

On the same vignettes (from the run's stored config; the run's own evals of base, null and healed
rounds are reused when they were made on exactly these vignettes, --fresh evaluates them again):
  base      the original model
  steer     the original model steered by the round-0 teacher vector over a grid of strengths (default 7,
            from 0 to the largest strength the run applied)
  prompt    the original model with the persona's prompt ladder as system prompt: prompts of rising force
            (data/personas.json `ladder`, or --ladder FILE: one prompt per line, or JSONL with `system`)
  random    the original model steered by --n-null random directions with the teacher's per-layer norms,
            at the run's round-0 eval strength, on the run's null subset of the vignettes (--null-vignettes,
            seeded): the null (the run measured --null-vectors of them, 32 by default)
  healed    the student after each completed round, unsteered
Every shift is paired against base (on the random arm's own subset for the null), with a paired-bootstrap
95 % interval over the vignettes, three ways: raw (dTrait), calibrated by the content-free prior
(dTrait_cal) and item-discriminative (dTrait_disc: the shift on target-labelled vignettes minus the shift
on the rest; ~0 when only the answer word's prior moved). dPrior is the shift of the target answer's
content-free prior itself, and separation the arm's own item discrimination (the target answer's calibrated
log-odds on target-labelled vignettes minus the rest; dTrait_disc is its change from base's).
Headline: A_steer and A_prompt per healed round = the healed point's trait (in the persona's direction)
minus what the steering curve / the prompt ladder reaches at the healed point's coherence (positive = the
loop buys more trait than the alternative at that coherence), with intervals that resample the vignettes
and recompute every curve; computed for each trait kind on both coherence axes, answer mass and the
capability tax ref_nll (`advantage_by_trait[kind][axis]`; `advantage_by_axis` is the raw trait's, and
`advantage` its --x axis). Writes <run>/frontier.json (rows, advantage) and
<run>/frontier.png unless --out names another JSON path (the figure goes beside it), and the per-vignette
rows of every arm but the healed ones to <run>/frontier_arms.jsonl (<stem>_arms.jsonl beside --out).

Comparing heal variants of one teacher vector (e.g. --heal-target sft vs kl_teacher at the same seed)?
--arms-from OTHER_RUN reuses that run's base, steer, prompt and random arms instead of measuring them
again; it refuses unless both runs share the model (and the dtype and device it ran in), the persona, the
think budget, the vignettes and reference answers, the null's strength and the round-0 teacher vector
(compared by content), so only the healed rounds are this run's own.
(scripts/diag_frontier.py is the same entry point from a checkout; a sweep runs this module.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from tabulate import tabulate

from steer_heal import null as nulls
from steer_heal import paired
from steer_heal.cli import ArgumentParser, cli, nonneg_float, nonneg_int, positive_int
from steer_heal.data import LadderRow, decoded, read_jsonl
from steer_heal.errors import UserError
from steer_heal.evaluate import Scored
from steer_heal.figures import frontier_png
from steer_heal.frontier import AXES, Point, compare, foundation_table, verdict_lines
from steer_heal.records import prior_key
from steer_heal.rundir import atomic_write_json, atomic_write_jsonl

ARMS = "frontier_arms.jsonl"  # beside the default frontier.json


def ladder_from(path: Path | None, default: tuple[str, ...]) -> list[str]:
    """The prompt ladder: --ladder FILE (plain lines, or JSONL with a `system` field), else the persona's."""
    if path is None:
        return list(default)
    if path.suffix == ".jsonl":
        return [r.system for r in read_jsonl(path, LadderRow)]
    if not path.is_file():
        raise UserError(f"--ladder {path}: no such file")
    lines = [x.strip() for x in decoded(path.read_bytes(), f"--ladder {path}").splitlines() if x.strip()]
    if not lines:
        raise UserError(f"--ladder {path}: no prompts in it (one system prompt per line)")
    return lines


def saved(run: paired.OpenRun, r: int, model: str, m: dict | None, ids: list[str] | None = None) -> Scored | None:
    """An eval the run already made (its event and per-vignette rows), if it was on these vignettes (`ids`,
    default the run's)."""
    path = run.rd.eval_rows(r, model)
    if m is None or not path.is_file():
        return None
    rows = read_jsonl(path)
    want = ids if ids is not None else [v.id for v in run.s.vigs]
    return Scored(m, rows) if [str(x["id"]) for x in rows] == want else None


def run_null(run: paired.OpenRun, base: Scored, n: int) -> list[Scored]:
    """The run's own random null (round 0, base model, at its eval strength), when it has n directions saved
    on the subset these vignettes give."""
    null, tk = run.info.null, run.trait_key
    if not null or len(null["seeds"]) < n:
        return []
    if "trait" in null and null["vignette_ids"] != [v.id for v in nulls.null_vignettes(run.s)]:
        return []  # schema 1.3, measured on another subset than these vignettes give
    out = []
    for i in range(n):
        if "trait" in null:  # schema 1.3: a subset of the vignettes, no ref_nll
            m, ids = {tk: null["trait"][i], "coherence": null["coherence"][i]}, null["vignette_ids"]
        else:  # before: every vignette, with ref_nll
            m = {tk: base.m[tk] + null["dtrait"][i], "coherence": base.m["coherence"] + null["dcoh"][i],
                 "ref_nll": null["ref_nll"][i], "ref_items": null["ref_items"][i]}  # fmt: skip
            ids = None
        ev = saved(run, null["round"], f"null{i}", m, ids)
        if ev is None:
            return []
        out.append(ev)
    return out


def measure(run: paired.OpenRun, cs: list[float], ladder: list[str], n_null: int, fresh: bool) -> list[Point]:
    """Every arm but the healed rounds on the run's vignettes (the null on its subset). The run's own evals of
    the base and of its random null are reused when they were made on exactly these vignettes (unless
    `fresh`); the steering grid and the prompt ladder are always evaluated now."""
    s, v0, c_run, info = run.s, run.rd.vectors(0), run.steered_c(0), run.info
    base = (None if fresh else saved(run, -1, "base", info.base)) or s.evaluate(desc="eval base")
    points = [Point("base", "base", base)]
    for c in cs:
        ev = base if c == 0 else s.evaluate(v0, c, desc=f"eval steer c={c:g}")
        points.append(Point(f"steer c={c:g}", "steer", ev, {"c": c}))
    for k, system in enumerate(ladder, 1):
        points.append(Point(f"prompt {k}", "prompt", s.evaluate(system=system, desc=f"eval prompt {k}"),
                            {"force": k, "system": system}))  # fmt: skip
    null = [] if fresh else run_null(run, base, n_null)
    seeds = info.null["seeds"][:n_null] if null else nulls.null_seeds(s.cfg, n_null)
    evs = null or nulls.direction_evals(s, v0, c_run, seeds, nulls.null_vignettes(s), "random")
    points += [
        Point(f"random {i}", "random", ev, {"c": c_run, "seed": sd}) for i, (sd, ev) in enumerate(zip(seeds, evs))
    ]
    return points


def digest(obj) -> str:
    """sha256 of a JSON-able value: compares content, not the path it was read from."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def arms_key(run: paired.OpenRun) -> dict:
    """What the base, steer, prompt and random arms depend on; two runs with equal keys measured the same
    arms (up to the run-to-run float noise of the device). Vector, vignettes and reference answers are
    compared by content; the model by its name and the dtype and device it actually ran in."""
    s, cfg = run.s, run.s.cfg
    vec = hashlib.sha256()
    for layer, v in sorted(run.rd.vectors(0).items()):
        vec.update(f"{layer}:".encode() + v.float().numpy().tobytes())
    param = next(s.model.parameters())
    return {"model": cfg.model, "dtype": str(param.dtype), "device": param.device.type, "tokenizer": cfg.tokenizer,
            "persona": cfg.extract.persona, "think_tokens": cfg.eval.eval_think_tokens,
            "vignettes": digest([dataclasses.astuple(v) for v in s.vigs]), "references": digest(s.reference_pairs()),
            "null_vignettes": digest([v.id for v in nulls.null_vignettes(s)]), "c_null": run.steered_c(0),
            "vector": vec.hexdigest()}  # fmt: skip


def save_arms(path: Path, key: dict, points: list[Point]) -> None:
    """Every arm but the healed ones, with its metrics and per-vignette rows, under `key`."""
    lines = [{"key": key}] + [{"arm": p.arm, "kind": p.kind, "extra": p.extra, "m": p.ev.m, "rows": p.ev.rows}
                              for p in points if p.kind != "healed"]  # fmt: skip
    atomic_write_jsonl(path, lines)


def load_arms(src: Path, key: dict) -> list[Point]:
    """Another run's saved arms (its run directory or its frontier_arms.jsonl), if it measured them under the
    same key; a UserError naming what differs otherwise."""
    path = src / ARMS if src.is_dir() else src
    if not path.is_file():
        raise UserError(
            f"--arms-from {src}: no {ARMS} there; measure that run's frontier first (python -m steer_heal.frontier_run)"
        )
    lines = read_jsonl(path)
    if not lines or not isinstance(lines[0].get("key"), dict):
        raise UserError(
            f"--arms-from {path}: no key line at its top; write it again with python -m steer_heal.frontier_run"
        )
    theirs, arms = lines[0]["key"], lines[1:]
    differ = sorted(k for k in set(key) | set(theirs) if key.get(k) != theirs.get(k))
    if differ:
        raise UserError(f"--arms-from {src}: measured under another {', '.join(differ)} than this run "
                        "(the arms are only comparable with the same model, dtype, device, vignettes, "
                        "reference answers, null strength and round-0 teacher vector)")  # fmt: skip
    return [Point(a["arm"], a["kind"], Scored(a["m"], a["rows"]), a["extra"]) for a in arms]


def healed_points(run: paired.OpenRun, fresh: bool) -> list[Point]:
    """The student after each completed round: the run's own eval when it is on these vignettes."""
    s, points = run.s, []
    for r in run.require_rounds():
        ev = None if fresh else saved(run, r, "healed", run.info.healed_eval(r))
        if ev is None:
            for k in range(len(s.student.baked), r + 1):  # the adapters up to round r, once each
                s.student.load_adapter(k, run.rd.adapter(k))
            ev = s.evaluate(desc=f"eval healed r{r}")
        points.append(Point(f"healed r{r}", "healed", ev, {"round": r}))
    return points


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--cs", nargs="+", type=nonneg_float, help="steering strengths (default: 7, 0 to the run's max)")
    ap.add_argument("--n-null", type=nonneg_int, help="random directions for the null (default: the run's own number)")
    ap.add_argument("--ladder", type=Path, help="system prompts of rising force (default: the persona's ladder)")
    ap.add_argument("--x", choices=AXES, default="coherence", help="the axis of the figure and of `advantage`")
    ap.add_argument("--n-vignettes", type=positive_int, help="score only the first N vignettes (balanced order)")
    ap.add_argument("--eval-vignettes", help="score on these vignettes instead of the run's")
    ap.add_argument("--out", type=Path, help="the JSON to write (default <run>/frontier.json)")
    ap.add_argument("--fresh", action="store_true", help="evaluate base, null and healed anew (not the run's)")
    ap.add_argument("--arms-from", type=Path, help="reuse this run's base/steer/prompt/random arms (same vector)")
    a = ap.parse_args(argv)
    if a.arms_from and (a.cs or a.ladder or a.fresh or a.n_null is not None):
        raise UserError("--arms-from takes the steering grid, the ladder and the null from that run: drop --cs, "
                        "--ladder, --n-null and --fresh")  # fmt: skip
    t0 = time.time()
    run = paired.open_run(a.run_dir, a.eval_vignettes, a.n_vignettes)
    a.n_null = (run.s.cfg.eval.null_vectors or 32) if a.n_null is None else a.n_null
    run.require_rounds()
    s, tk, sign = run.s, run.trait_key, run.s.persona.sign
    key, out = arms_key(run), a.out or run.rd.root / "frontier.json"
    if a.arms_from:
        points = load_arms(a.arms_from, key)
        cs = [p.extra["c"] for p in points if p.kind == "steer"]
        ladder = [p.extra["system"] for p in points if p.kind == "prompt"]
        print(f"{run.rd.root.name}: base, steer, prompt and random arms from {a.arms_from}", file=sys.stderr)
    else:
        c_max = max((q["c"] for f in run.info.filters for q in f.get("q0", [])), default=run.steered_c(0))
        cs = sorted({float(c) for c in a.cs or np.linspace(0, c_max, 7).round(3)} | {0.0})
        ladder = ladder_from(a.ladder, run.s.persona.prompt_ladder())
        print(f"{run.rd.root.name}: {len(s.vigs)} vignettes; steer at {cs}; {len(ladder)} prompts; {a.n_null} "
              f"random directions at c={run.steered_c(0):g} on {len(nulls.null_vignettes(s))} vignettes",
              file=sys.stderr)  # fmt: skip
        points = measure(run, cs, ladder, a.n_null, a.fresh)
    save_arms(out.with_name(f"{out.stem}_arms.jsonl"), key, points)  # so a third run can point here too
    points += healed_points(run, a.fresh)
    rows, by_trait = compare(points, points[0].ev, s.persona.trait, sign, run.idx, s.bootstrap_seed, prior_key(tk))
    by_axis = by_trait["raw"]
    adv = by_axis.get(a.x) or []
    cols = ["arm", tk, "coherence", "ref_nll", "dTrait", "dTrait_cal", "dTrait_disc", "dPrior", "dCoh", "null_pct",
            "null_pct_disc", "specificity"]  # fmt: skip
    for r in rows:
        r[tk] = next(p.ev.m[tk] for p in points if p.arm == r["arm"])
    print(paired.table(rows, cols))
    print("\nevery foundation's shift (nats, 95% CI):")
    print(tabulate(foundation_table(rows), headers="keys", tablefmt="github"))
    for kind, axes in by_trait.items():
        for axis, lines in axes.items():
            print("\n" + "\n".join(verdict_lines(lines, tk, axis, kind)))
    null = [r for r in rows if r["kind"] == "random"]
    doc = {"run": run.rd.root.name, "seed": s.cfg.seed, "trait_key": tk, "sign": sign, "x": a.x,
           "vignettes": s.vig_source, "n": len(s.vigs), "n_boot": int(run.idx.shape[0]), "cs": cs, "ladder": ladder,
           "rows": rows, "advantage": adv, "advantage_by_axis": by_axis, "advantage_by_trait": by_trait,
           "null": {"n": len(null), "n_vignettes": null[0]["n_vignettes"] if null else None},
           "arms_from": str(a.arms_from or ""), "seconds": time.time() - t0}  # fmt: skip
    atomic_write_json(out, doc)
    png = out.with_suffix(".png")
    frontier_png(rows, png, tk, a.x, f"{run.rd.root.name}: {len(s.vigs)} vignettes, x = {a.x}")
    print(f"\nwrote {out} and {png} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    cli(main)

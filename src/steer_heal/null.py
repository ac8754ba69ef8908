"""The random-direction null: how far the trait moves when the base model is steered by directions that are
not the teacher vector but carry its per-layer norms. One implementation, shared by the run (round 0),
scripts/diag_null.py (the subset checked against every vignette) and the frontier (its random arm).

    seeds = null_seeds(cfg)                           # one seed per direction
    evs = direction_evals(s, v, c, seeds, vigs)       # the base model steered by each direction
    est, draws = direction_shifts(evs, base, target, n_boot, seed)   # per trait kind: [D] and [D, B]
    summary, evs = random_null(s, v, c, base)         # the run's `null` event
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from steer_heal import data, extract, seeds, stats
from steer_heal.config import RunConfig
from steer_heal.evaluate import Scored
from steer_heal.records import null_key


def null_seeds(cfg: RunConfig, n: int | None = None) -> list[int]:
    """The seeds of the first n random directions (default --null-vectors) of a run with this config."""
    return [seeds.derive(cfg.seed, "null", -1, i) for i in range(cfg.eval.null_vectors if n is None else n)]


def null_vignettes(s) -> list[data.Vignette]:
    """The fixed, seeded, label-balanced subset of the session's vignettes the null is measured on."""
    return data.seeded_subset(s.vigs, s.cfg.eval.null_vignettes, seeds.derive(s.cfg.seed, "null_vignettes"))


def direction_evals(s, v: dict[int, torch.Tensor], c: float, dir_seeds: list[int], vigs, desc: str = "null"):
    """The base model's eval on `vigs` steered at c by one random direction per seed (v's norms per layer), no
    ref_nll: the null is about the trait."""
    evs = []
    with s.as_model("base"):
        for i, sd in enumerate(tqdm(dir_seeds, desc=f"{desc} directions", leave=False)):
            evs.append(s.evaluate(extract.random_like(v, sd), c, desc=f"{desc} {i}", vigs=vigs, references=False))
    return evs


def direction_shifts(evs: list[Scored], base: Scored, target: str, n_boot: int, seed: int):
    """Per trait kind that every direction can give: each direction's shift [D] and its value on each vignette
    resample [D, B], paired with base on the directions' vignettes."""
    ids = evs[0].arm.ids
    sub, idx = base.arm.take(ids), stats.resamples(len(ids), n_boot, seed)
    est, draws = {}, {}
    for kind in stats.TRAITS:
        sh = [stats.shift(kind, ev.arm, sub, target, idx) for ev in evs]
        if all(x is not None for x in sh):
            est[kind], draws[kind] = np.array([x[0] for x in sh]), np.stack([x[1] for x in sh])
    return est, draws


def random_null(s, v: dict[int, torch.Tensor], c: float, base: Scored) -> tuple[dict, list[Scored]]:
    """The run's null: --null-vectors directions at c on the --null-vignettes subset, paired with the base eval
    on the same vignettes. Returns the `null` event (per direction its shifts, absolute trait and coherence;
    per kind the null's 95 % range with its two-level bootstrap interval) and each direction's eval."""
    e, tk = s.cfg.eval, s.persona.trait_key
    sds, vigs = null_seeds(s.cfg), null_vignettes(s)
    evs = direction_evals(s, v, c, sds, vigs)
    ids = [x.id for x in vigs]
    sub = base.arm.take(ids)
    summary = {
        "c": c,
        "seeds": sds,
        "vignette_ids": ids,
        "n_vignettes": len(ids),
        "trait": [ev.m[tk] for ev in evs],
        "coherence": [ev.m["coherence"] for ev in evs],
        "dcoh": [ev.arm.coherence() - sub.coherence() for ev in evs],
        "range": {},
    }
    boot = s.bootstrap_seed
    est, draws = direction_shifts(evs, base, s.persona.trait, e.n_boot, boot)
    for kind, x in est.items():
        summary[null_key(kind)] = x.tolist()
        summary["range"][kind] = stats.null_range(x, draws[kind], e.n_boot, boot)
    return summary, evs

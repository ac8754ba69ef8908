"""Gate 1 screen: which persona pair and layer band move the judgement on this model, against a random direction?

    uv run python scripts/diag_screen.py --personas care_vs_authority warm_vs_cold --bands 0.3,0.4 0.45,0.55 \
        --doses 0.5 [--n-null 1] [--out screen.json] [run flags: --preset, --model, --n-vignettes ...]

Bands differ in residual norm, so a raw strength c means a different dose in each. Here every vector is
given at a *relative dose* r: each band layer's vector is rescaled so that

    |c v_L| = r * mean_x |h_L(x)|        (h_L: block L's output at the last prompt token, neutral prompts)

and the same r is given to `--n-null` random directions per band, drawn at the same per-layer norms (the
null for that band). Every shift is paired against the unsteered base on the same vignettes, with a 95 %
bootstrap interval: the trait raw (dTrait), calibrated by the content-free prior (dCal) and
item-discriminative (dDisc), and coherence (dCoh). A screen picks where to look; it is not a result: a
configuration chosen here is confirmed on other seeds and against the full null (diag_frontier.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tabulate import tabulate

from steer_heal import data, extract, models, seeds, stats
from steer_heal.cli import ArgumentParser, cli, nonneg_float, nonneg_int
from steer_heal.errors import UserError
from steer_heal.rundir import atomic_write_json
from steer_heal.session import Session


def band_arg(text: str) -> tuple[float, float]:
    """'0.3,0.4' -> (0.3, 0.4)."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"band {text!r} is not 'lo,hi' (fractions of depth, e.g. 0.3,0.4)") from e
    if not (0 <= lo <= hi <= 1):  # NaN fails this too
        raise argparse.ArgumentTypeError(f"band {text!r} must be fractions of depth with 0 <= lo <= hi <= 1")
    return lo, hi


def at_dose(v: dict, h_norm: dict, r: float) -> dict:
    """Each layer's vector rescaled to r * the layer's mean residual norm (applied at c = 1)."""
    return {L: x * (r * h_norm[L]) for L, x in extract.unit(v).items()}


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--personas", nargs="+", required=True, help="persona pair names (data/personas.json)")
    ap.add_argument("--bands", type=band_arg, nargs="+", required=True, help="layer bands 'lo,hi'")
    ap.add_argument("--doses", type=nonneg_float, nargs="+", default=[0.5], help="relative doses r")
    ap.add_argument("--n-null", type=nonneg_int, default=1, help="random directions per band and dose")
    ap.add_argument("--out", type=Path, help="write the records as JSON here")
    args, rest = ap.parse_known_args(argv)
    t0 = time.time()
    s = Session.from_argv(rest)
    e = s.cfg.extract
    pairs = [data.persona(name, None, None, e.personas_file) for name in args.personas]
    n_layers = len(models.decoder_layers(s.model))
    bands = {b: models.band(n_layers, b, "--bands") for b in args.bands}
    if len({tuple(x) for x in bands.values()}) < len(bands):
        raise UserError(f"--bands {args.bands} name the same layers twice on {n_layers} layers: {list(bands.values())}")
    all_layers = sorted({L for ls in bands.values() for L in ls})
    acts = extract.last_token_acts(s.model, s.neutral_ids, all_layers, s.tok.pad_token_id, e.extract_batch_size)
    h_norm = {L: float(acts[L].norm(dim=-1).mean()) for L in all_layers}
    base = s.evaluate(desc="eval base", references=False)
    idx = s.resamples()
    recs = []

    def measure(kind: str, scored: list[data.Persona], b, r: float, v: dict, raw_c: float | None) -> None:
        """One steered eval, read as a shift of each scored pair's trait."""
        ev = s.evaluate(v, 1.0, desc=f"eval {kind} {b} r={r:g}", references=False)
        for p in scored:
            d = stats.paired_deltas(ev.arm, base.arm, p.trait, idx)
            rec = {"kind": kind, "persona": p.name, "trait": p.trait, "sign": p.sign, "band": b, "layers": bands[b],
                   "r": r, "raw_c": raw_c, "coherence": ev.m["coherence"],
                   **{k: d[k] for k in ("dTrait", "dTrait_cal", "dTrait_disc", "dCoh")}}  # fmt: skip
            recs.append(rec)
            shifts = ", ".join(f"{name} {stats.Estimate.of(rec[k]).text()}" for name, k in
                               (("dTrait", "dTrait"), ("dCal", "dTrait_cal"), ("dDisc", "dTrait_disc")))  # fmt: skip
            print(f"{kind:7s} {p.name:22s} {b} r={r:g}: coherence {rec['coherence']:.3f}, {shifts}  "
                  f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip

    for b, layers in bands.items():
        for p in pairs:
            v = extract.teacher_vector(s.model, s.tok, p, s.contexts, layers, e.extract_batch_size)
            for r in args.doses:  # raw_c: the raw strength giving this dose, averaged over the band's layers
                raw_c = sum(r * h_norm[L] / float(v[L].norm()) for L in layers) / len(layers)
                measure("persona", [p], b, r, at_dose(v, h_norm, r), raw_c)
        for k in range(args.n_null):
            # A direction per band and k, the same at every dose; its own seed range, apart from the run's
            rand = extract.random_like({L: acts[L][0] for L in layers}, seeds.derive(s.cfg.seed, "screen", -1, k))
            for r in args.doses:
                measure(f"null{k}", pairs, b, r, at_dose(rand, h_norm, r), None)
    cols = ["kind", "persona", "band", "r", "raw_c", "coherence", "dTrait", "dTrait_cal", "dTrait_disc", "dCoh"]
    table = [[stats.Estimate.of(x[k]).text() if isinstance(x[k], dict) else x[k] for k in cols] for x in recs]
    print(f"\nGate 1 screen: {s.cfg.model}, {len(s.vigs)} vignettes, base coherence {base.m['coherence']:.3f}, "
          f"mean residual norm per layer " + ", ".join(f"{L}:{h_norm[L]:.0f}" for L in all_layers))  # fmt: skip
    print(tabulate(table, headers=cols, floatfmt=".3f", tablefmt="github"))
    if args.out:
        atomic_write_json(
            args.out, {"model": s.cfg.model, "n_vignettes": len(s.vigs), "h_norm": h_norm, "records": recs}
        )
    print(f"\n({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    cli(main)

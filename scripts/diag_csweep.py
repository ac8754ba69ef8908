"""Gate 1 c-sweep: does the teacher vector move the trait while the model stays coherent?
Every shift is paired against c = 0 on the same vignettes, with a 95 % bootstrap interval: the trait raw
(dTrait), calibrated by the content-free prior (dCal) and item-discriminative (dDisc), and coherence (dCoh).

    uv run python scripts/diag_csweep.py --cs 0 0.5 1 2 3 4 [--out csweep.json] [run flags: --preset, --model,
        --persona, --steer-layers, --n-vignettes, --eval-vignettes ...]

For each strength c: trait and coherence on the vignette eval (steering added at every position),
the tail perplexity of one greedy steered completion under the unsteered model, and that completion.
Prints a table; writes one JSON record per c (c, <trait>_nats for all seven, coherence, ...).
"""

from __future__ import annotations

import time
from pathlib import Path

from tabulate import tabulate

from steer_heal import stats
from steer_heal.cli import ArgumentParser, cli, nonneg_float, nonneg_int
from steer_heal.rundir import atomic_write_json
from steer_heal.session import Session


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--cs", type=nonneg_float, nargs="+", default=[0, 0.5, 1, 2, 3, 4], help="steering strengths")
    ap.add_argument("--out", type=Path, help="write the records as JSON here")
    ap.add_argument("--prompt-index", type=nonneg_int, default=0, help="which generation prompt to complete per c")
    args, rest = ap.parse_known_args(argv)
    t0 = time.time()
    s = Session.from_argv(rest)
    v = s.teacher()
    prompt = s.prompts[args.prompt_index % len(s.prompts)]
    comps = s.complete(v, args.cs, prompt)
    ppl = s.base_tail_ppl([(c.prompt_ids, c.ids) for c in comps])  # graded unsteered, as the filter does
    recs = []
    tk = s.persona.trait_key
    base = s.evaluate(desc="eval c=0")
    idx = s.resamples()
    for c, comp, p in zip(args.cs, comps, ppl):
        ev = base if c == 0 else s.evaluate(v, c, desc=f"eval c={c:g}")
        m, d = ev.m, stats.paired_deltas(ev.arm, base.arm, s.persona.trait, idx)
        recs.append(
            {
                "c": c,
                **{k: m[k] for k in m if k.endswith("_nats")},
                "coherence": m["coherence"],
                "dTrait [95% CI]": stats.Estimate.of(d["dTrait"]).text(),
                "dCal [95% CI]": stats.Estimate.of(d["dTrait_cal"]).text(),
                "dDisc [95% CI]": stats.Estimate.of(d["dTrait_disc"]).text(),
                "dCoh [95% CI]": stats.Estimate.of(d["dCoh"]).text(),
                "ref_nll": m["ref_nll"],
                "frac_unscorable": m["frac_unscorable"],
                "prefill_nll": m["prefill_nll"],
                "acc": m["acc"],
                "completion_tail_ppl": p,
                "completion": comp.text,
            }
        )
    cols = ["c", tk, "coherence", "dTrait [95% CI]", "dCal [95% CI]", "dDisc [95% CI]", "dCoh [95% CI]", "ref_nll",
            "care_nats", "auth_nats", "frac_unscorable", "completion_tail_ppl"]  # fmt: skip
    cols = list(dict.fromkeys(cols))
    print(
        f"\nGate 1 c-sweep: {s.cfg.model}, persona {s.persona.name} (trait {tk}, expected sign {s.persona.sign:+d}), "
        f"layers {s.layers}, {len(s.vigs)} vignettes ({s.vig_source}), |v| per layer "
        + ", ".join(f"{L}:{float(x.norm()):.1f}" for L, x in v.items())
    )
    print(tabulate([[r[k] for k in cols] for r in recs], headers=cols, floatfmt=".3f", tablefmt="github"))
    print(f"\nprompt: {prompt}")
    for r in recs:
        print(f"\n--- c = {r['c']:g} (tail ppl {r['completion_tail_ppl']:.1f}) ---\n{r['completion'][:400]}")
    if args.out:
        meta = {"model": s.cfg.model, "persona": s.persona.name, "layers": s.layers, "trait_key": tk}
        atomic_write_json(
            args.out, meta | {"vignettes": s.vig_source, "n_vignettes": len(s.vigs), "prompt": prompt, "records": recs}
        )
    print(f"\n({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    cli(main)

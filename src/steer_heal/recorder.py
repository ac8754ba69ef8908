"""The one place each stage's artifacts are written, its event emitted and its log line printed.

    rec = Recorder(rd, trait_key)
    rec.eval(r, "steered", metrics, rows, c=2.0, vignettes=src, seconds=31.0)

Artifacts are written before the event that points at them; a round's DONE marker is written last,
after its `round` event (rundir.py, events.py).
"""

from __future__ import annotations

import dataclasses
import json

import torch
from loguru import logger

from steer_heal import events, extract, filters
from steer_heal.errors import Starved
from steer_heal.evaluate import Scored
from steer_heal.heal import HealResult
from steer_heal.records import RoundRecord
from steer_heal.rundir import RunDir, atomic_write_json, atomic_write_jsonl, atomic_write_text, save_tensors
from steer_heal.stages import Collected, HealData
from steer_heal.stats import Estimate, cal_key


def near_threshold(scored: list[dict], ppl_max: float, k: int = 2) -> dict:
    """A few kept and dropped completions whose tail-ppl is closest to the threshold (for eyeballing)."""

    def pick(rows):
        rows = sorted((r for r in rows if r["tail_ppl"] is not None), key=lambda r: abs(r["tail_ppl"] - ppl_max))[:k]
        return [
            {"alpha": r["alpha"], "tail_ppl": r["tail_ppl"], "reason": r["reason"], "text": r["text"][:300]}
            for r in rows
        ]

    return {"kept": pick([r for r in scored if r["keep"]]), "dropped": pick([r for r in scored if not r["keep"]])}


class Recorder:
    def __init__(self, rd: RunDir, trait_key: str):
        self.rd, self.tk = rd, trait_key
        self.events = events.Events(rd.events)

    def emit(self, stage: str, r: int, **fields) -> dict:
        return self.events.emit(stage, r, **fields)

    def config(self, meta: dict) -> None:
        atomic_write_json(self.rd.config, meta)  # first artifact: the run describes itself
        self.emit("config", -1, **meta)

    def eval(self, r: int, which: str, ev: Scored, c: float, vignettes: str, seconds: float) -> None:
        atomic_write_jsonl(self.rd.eval_rows(r, which), ev.rows)
        m = ev.m
        cal = m.get(cal_key(self.tk))
        cal = f" (calibrated {cal:+.3f})" if cal is not None else ""
        logger.info(
            f"eval r{r} {which}: {self.tk} {m[self.tk]:+.3f}{cal}, coherence {m['coherence']:.3f}, "
            f"ref_nll {m['ref_nll']:.3f}, acc {m['acc']}"
        )
        self.emit("eval", r, model=which, c=c, vignettes=vignettes, seconds=seconds, **m)

    def null(self, r: int, null: dict, evs: list[Scored], seconds: float) -> None:
        """The null's per-vignette rows (rounds/r00/eval_null<i>.jsonl: the frontier reuses them), then its event."""
        for i, ev in enumerate(evs):
            atomic_write_jsonl(self.rd.eval_rows(r, f"null{i}"), ev.rows)
        self.emit("null", r, **null, seconds=seconds)
        ranges = "; ".join(f"{k} {Estimate.of(x).interval()}" for k, x in null["range"].items())
        logger.info(f"random null at c {null['c']:.3g} ({len(null['seeds'])} directions on {null['n_vignettes']} "
                    f"vignettes, {seconds:.0f} s): 95% range of the {self.tk} shift: {ranges}")  # fmt: skip

    def filter_threshold(self, cal: dict, seconds: float) -> None:
        self.emit("calibrate", -1, **cal, seconds=seconds)
        logger.info(
            f"filter calibration: tail-ppl median {cal['base_median_ppl']:.2f} (base samples), "
            f"{cal['reference_median_ppl']:.2f} (reference answers); q{cal['ppl_quantile']:g} of both "
            f"{cal['quantile_ppl']:.2f} x {cal['ppl_mult']:g} -> ppl_max {cal['ppl_max']:.2f}"
        )

    def extract(self, r: int, v: dict[int, torch.Tensor], meta: dict[str, str], cos_v0: float, seconds: float) -> None:
        save_tensors(self.rd.vector(r), {str(L): x for L, x in v.items()}, meta)
        layers, per_layer = sorted(v), {L: float(x.norm()) for L, x in v.items()}
        self.emit("extract", r, layers=layers, norm=extract.norm(v), per_layer_norm=per_layer, cos_v0=cos_v0,
                  n_contexts=int(meta["n_contexts"]), seconds=seconds)  # fmt: skip
        logger.info(f"extract r{r}: layers {layers}, |v| {extract.norm(v):.2f}, cos(v, v0) {cos_v0:.3f}")

    def isokl(self, r: int, iso: dict, seconds: float) -> None:
        self.emit("isokl", r, **iso, seconds=seconds)
        logger.info(
            f"iso-KL r{r}: c* {iso['c_star']:.3g} gives p95 KL {iso['kl_p95']:.3f} (target {iso['target']}), "
            f"{len(iso['tried'])} evals"
        )

    def collected(self, r: int, col: Collected, ppl_max: float, alphas, clock) -> None:
        """completions.jsonl, then the `generate` and `filter` events, and the Q0 table in the log."""
        atomic_write_jsonl(self.rd.completions(r), col.scored)
        q0, gen_s = filters.q0_table(col.scored), clock["generate"]
        self.emit(
            "generate", r, n=col.n_generated, tokens=col.tokens, tokens_per_s=col.tokens / max(gen_s, 1e-9),
            seconds=gen_s, alphas=list(alphas), kappa=col.kappa,
            hit_cap_frac=sum(x["hit_cap"] for x in col.scored) / len(col.scored),
        )  # fmt: skip
        self.emit(
            "filter", r, kappa=col.kappa, ppl_max=ppl_max, q0=q0, n_kept=len(col.kept), n_scored=len(col.scored),
            seconds=clock["filter"], samples=near_threshold(col.scored, ppl_max), starved=False,
        )  # fmt: skip
        logger.info(
            f"filter r{r} (kappa {col.kappa:g}, ppl_max {ppl_max:.1f}): kept {len(col.kept)}/{len(col.scored)}\n"
            f"{filters.format_q0(q0)}"
        )

    def starved(self, r: int, e: Starved, ppl_max: float) -> None:
        """Every scored completion and the Q0 table of a round that could not bank enough."""
        atomic_write_jsonl(self.rd.completions(r), e.scored)
        n_kept = sum(x["keep"] for x in e.scored)
        self.emit("filter", r, kappa=e.kappa, ppl_max=ppl_max, q0=filters.q0_table(e.scored), n_kept=n_kept,
                  n_scored=len(e.scored), starved=True)  # fmt: skip

    def heal(self, r: int, res: HealResult, data: HealData, heal_cfg) -> None:
        """The heal event (and, under --heal-data on_policy, every on-policy completion scored)."""
        h = heal_cfg
        if data.on_policy:
            atomic_write_jsonl(self.rd.round(r) / "on_policy.jsonl", data.on_policy)
        self.emit("heal", r, **dataclasses.asdict(res), n_train=len(data.pairs), n_steered=data.n_steered,
                  n_on_policy=len(data.pairs) - data.n_steered, reg=h.reg, lam=h.lam, tau=h.tau, kl_agg=h.kl_agg,
                  barrier_ref=h.barrier_ref)  # fmt: skip

    def heal_step(self, r: int):
        """The `emit` a heal loop calls every few steps."""
        return lambda **fields: self.emit("heal_step", r, **fields)

    def bake(self, r: int, student, name: str) -> None:
        student.save_adapter(name, self.rd.adapter(r))
        self.emit("bake", r, adapter=str(self.rd.adapter(r).relative_to(self.rd.root)), stack=list(student.baked))

    def collapse(self, r: int, which: str, sig: dict, seconds: float) -> None:
        self.emit("collapse", r, model=which, **sig, seconds=seconds)
        amp = f", amp {sig['amp']:.3f}" if sig.get("amp") is not None else ""
        ent = f", entropy {sig['entropy_mean']:.3f} (p5 {sig['entropy_p5']:.3f})" if sig.get("entropy_mean") else ""
        logger.info(f"collapse r{r} {which}: PR band {sig['pr_band']:.2f}, PR final {sig['pr_final']:.2f}{ent}{amp}")

    def samples(self, r: int, steered: list[dict], healed: list[dict]) -> None:
        rows = [{"prompt": s["prompt"], "steered": s["text"], "healed": h["text"]} for s, h in zip(steered, healed)]
        atomic_write_json(self.rd.round(r) / "samples.json", rows)

    def round(self, rec: RoundRecord) -> None:
        """The round record, then the DONE marker: the round is complete."""
        ev = self.emit("round", rec.round, **rec.fields())
        atomic_write_text(self.rd.done(rec.round), json.dumps({"round": rec.round, "ts": ev["ts"]}) + "\n")
        d = lambda x: "n/a" if x is None else f"{x:+.3f}"  # noqa: E731
        logger.info(
            f"round {rec.round}: {self.tk} steered {rec['steered_trait']:+.3f} healed {rec['healed_trait']:+.3f} "
            f"(base {rec['base_trait']:+.3f}), coherence {rec['healed_coh']:.3f}, retain {rec['retain']}; healed shift "
            f"raw {d(rec['dtrait_healed'])}, calibrated {d(rec.get('dtrait_cal_healed'))}, discriminative "
            f"{d(rec.get('dtrait_disc_healed'))}"
        )

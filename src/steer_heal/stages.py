"""The computations of a round's stages that need more than one call to the Session. Each takes what it
needs and returns values; writing artifacts and events is the Recorder's job (recorder.py).

    filter_threshold(s)                filter ppl threshold from the base model's own samples
    iso_kl(s, v)                       c* at which the vector costs --iso-kl nats (p95 KL)
    collect(s, r, v, ppl_max, ...)     walk-C: steered batches, scored and filtered, until enough are kept
    eval_strength(cfg, kappa, c_star)  the strength of the steered eval
    heal(s, pairs, r, emit)            the LoRA heal (with its out-of-memory retry)
    collapse_signals(s, which, acts)   dimensional budget, output entropy, amplification
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass

import torch
from loguru import logger

from steer_heal import bounds, collapse, extract, filters, isokl, models, seeds
from steer_heal.clock import Clock
from steer_heal.config import HealConfig, RunConfig
from steer_heal.errors import Starved, UserError
from steer_heal.generate import Completion, Row
from steer_heal.heal import HealResult, SteeredTeacher, heal_with_retry
from steer_heal.records import recorded
from steer_heal.session import Session

N_STUDENT_CONTEXTS = 64  # a mean over 64 neutral prompts is enough for a cosine; the teacher uses all
PROMPT_STRIDE = 7919  # each round starts its probes at a different prompt (prime stride)


def filter_threshold(s: Session) -> dict:
    """Filter threshold from what coherent text scores under the base model: its own unsteered completions
    on the generation prompts, and the shipped human-written reference answers."""
    f = s.cfg.filter
    own = s.threshold_ppls()
    refs = [p for p in s.base_tail_ppl(s.reference_pairs()) if p is not None]
    pool = own + refs
    return {
        "n": len(pool),
        "base_median_ppl": statistics.median(own),
        "reference_median_ppl": statistics.median(refs),
        "ppl_quantile": f.ppl_quantile,
        "quantile_ppl": filters.quantile(pool, f.ppl_quantile),
        "ppl_mult": f.ppl_mult,
        "ppl_max_override": f.ppl_max,
        "ppl_max": filters.ppl_threshold(pool, f.ppl_quantile, f.ppl_mult, f.ppl_max),
        "base_ppls": own,
        "reference_ppls": refs,
    }


def vector_meta(s: Session, r: int) -> dict[str, str]:
    """What a saved teacher vector was read from (safetensors metadata: strings only)."""
    p = s.persona
    return {
        "model": s.cfg.model, "layers": json.dumps(s.layers), "persona": p.name, "pos": p.pos, "neg": p.neg,
        "n_contexts": str(len(s.contexts)), "round": str(r), "normalized": str(s.cfg.extract.normalize),
    }  # fmt: skip


def iso_kl(s: Session, v: dict[int, torch.Tensor]) -> dict:
    """c* with p95 KL(steered at c* || unsteered) = --iso-kl on greedy completions of the first prompts."""
    g = s.cfg.generate
    ids = s.prompt_ids[: g.iso_kl_prompts]

    def d(c: float) -> float:
        seed = seeds.derive(s.cfg.seed, "iso_kl")
        return isokl.steered_kl_p95(s.model, s.tok, ids, v, c, g.max_new_tokens, g.gen_batch_size, seed)

    try:
        c_star, achieved, tried = isokl.solve_log(d, g.iso_kl, tol=g.iso_kl_tol)
    except ValueError as e:
        raise UserError(f"--iso-kl {g.iso_kl}: {e}; choose a target this vector can reach") from e
    scaled = f"--iso-kl {g.iso_kl} gives c* {c_star:.3g}, and"  # the strengths are multiples of c* from here on
    for err in (
        bounds.strength_error(f"{scaled} --alphas x c*", tuple(a * c_star for a in g.alphas), s.cfg.filter.kappa_floor),
        bounds.strength_error(f"{scaled} --eval-alpha x c*", ((s.cfg.eval.eval_alpha or 0.0) * c_star,), 1.0),
    ):
        if err:
            raise UserError(err)
    return {"target": g.iso_kl, "c_star": c_star, "kl_p95": achieved, "tried": tried}


@dataclass
class Collected:
    """What walk-C banked in a round: every scored completion, and the dose it settled on."""

    kappa: float = recorded()  # walk-C dose multiplier
    scored: list[dict]
    n_generated: int = recorded()
    tokens: int
    n_kept: int = recorded(init=False)

    def __post_init__(self):
        self.n_kept = len(self.kept)

    @property
    def kept(self) -> list[dict]:
        return [x for x in self.scored if x["keep"]]

    @property
    def pairs(self) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, sampled completion ids) of the kept completions: the heal's training data."""
        return [(x["prompt_ids"], x["ids"]) for x in self.kept]


def score(s: Session, comps: list[Completion], th: filters.Thresholds) -> list[dict]:
    """Each completion with its filter scores (tail-ppl under the original model), keep and reason."""
    persona = (s.persona.pos, s.persona.neg)
    ppl = s.base_tail_ppl([(c.prompt_ids, c.ids) for c in comps])
    return [
        {**dataclasses.asdict(c), "n_tokens": len(c.ids), "hit_cap": c.hit_cap,
         **filters.judge(c.text, len(c.ids), p, persona, th)}
        for c, p in zip(comps, ppl)
    ]  # fmt: skip


def collect(s: Session, r: int, vectors, ppl_max: float, c_star: float, clock: Clock) -> Collected:
    """Walk-C over mixed-strength batches: row coefficient = alpha x kappa x c* on the raw vector.
    Raises Starved (with the scored rows) when too few survive at the floor dose."""
    g, f, cfg = s.cfg.generate, s.cfg.filter, s.cfg
    th = filters.Thresholds.of(s.cfg.filter, ppl_max)
    offset = (r * PROMPT_STRIDE) % len(s.prompts)
    totals = {"n": 0, "tokens": 0}

    def probe(kappa: float, b: int) -> list[dict]:
        idx = [(offset + b * g.n_prompts + j) % len(s.prompts) for j in range(g.n_prompts)]
        rows = s.prompt_rows(idx, g.alphas, kappa, c_star)
        with clock("generate"):
            comps = s.generate(rows, seeds.derive(cfg.seed, "generate", r, b), f"generate r{r} k={kappa:g}", vectors)
        totals["n"] += len(comps)
        totals["tokens"] += sum(len(c.ids) for c in comps)
        with clock("filter"):
            return [x | {"kappa": kappa, "batch": b} for x in score(s, comps, th)]

    kappa, scored = filters.walk_c(probe, f.keep_target, f.kappa_floor, f.n_keep, f.min_train, f.max_collect_batches)
    return Collected(kappa=kappa, scored=scored, n_generated=totals["n"], tokens=totals["tokens"])


def eval_strength(cfg: RunConfig, kappa: float, c_star: float) -> float:
    """--eval-alpha, or the median alpha at the dose walk-C settled on; in units of c* on the raw vector."""
    c = cfg.eval.eval_alpha if cfg.eval.eval_alpha is not None else statistics.median(cfg.generate.alphas) * kappa
    return c * c_star


@dataclass
class RoundVectors:
    """The round's vectors and strengths, as the round record reports them."""

    c_eval: float = recorded()  # steered-eval strength on the raw vector
    c_star: float = recorded()  # iso-KL unit (1.0 when off)
    cos_v0: float = recorded()  # cos(teacher vector of this round, round 0's)
    cos_student_teacher: float = recorded()  # cos(v_student, v_teacher): how much of the vector the heal baked in
    norm_v: float = recorded()
    norm_student: float = recorded()


@dataclass
class HealData:
    """The round's training completions, each with the strength its teacher steers at."""

    pairs: list[tuple[list[int], list[int]]]
    coeffs: list[float]
    n_steered: int
    on_policy: list[dict]  # every on-policy completion scored (kept or not); [] with --heal-data steered


def heal_data(s: Session, r: int, col: Collected, ppl_max: float, clock: Clock) -> HealData:
    """The kept steered completions, or (--heal-data on_policy) the current student's own unsteered
    completions on the same prompts for --on-policy-frac of them, filtered like the steered ones; each
    keeps the strength of the steered row it replaces, for its teacher."""
    kept, h = col.kept, s.cfg.heal
    steered = [(x["prompt_ids"], x["ids"], x["coeff"]) for x in kept]
    if h.heal_data == "steered":
        return HealData([p[:2] for p in steered], [p[2] for p in steered], len(steered), [])
    n_on = round(h.on_policy_frac * len(kept))
    rows = [Row(x["prompt_idx"], x["prompt"], x["prompt_ids"], x["alpha"], x["coeff"]) for x in kept[:n_on]]
    with clock("on_policy"):
        comps = s.generate(rows, seeds.derive(s.cfg.seed, "on_policy", r), f"on-policy r{r}")  # no vectors: unsteered
        scored = score(s, comps, filters.Thresholds.of(s.cfg.filter, ppl_max))
    mine = [(x["prompt_ids"], x["ids"], x["coeff"]) for x in scored if x["keep"]]
    both = mine + steered[n_on:]
    if len(both) < s.cfg.filter.min_train:
        err = Starved(
            f"only {len(both)} training completions after the on-policy samples were filtered ({len(mine)} of "
            f"{len(scored)} kept; need >= --min-train {s.cfg.filter.min_train}); Q0 table:\n"
            f"{filters.format_q0(filters.q0_table(scored))}"
        )
        err.scored, err.kappa = scored, col.kappa
        raise err
    return HealData([p[:2] for p in both], [p[2] for p in both], len(steered) - n_on, scored)


def heal(s: Session, data: HealData, r: int, emit, vectors: dict[int, torch.Tensor]) -> HealResult:
    """The round's heal (halving its micro-batch once on out of memory: see `kept_heal_settings`)."""
    teacher = SteeredTeacher(vectors, data.coeffs)
    return heal_with_retry(s.student, data.pairs, s.cfg.heal, r, s.cfg.seed, s.tok.pad_token_id, emit, teacher)


def kept_heal_settings(h: HealConfig, res: HealResult) -> HealConfig | None:
    """The smaller micro-batch an out-of-memory retry fell back to, for the orchestrator to keep for the rest of
    the run (None when the heal ran at the configured size)."""
    if res.batch_size == h.heal_batch_size:
        return None
    logger.warning(f"heal batch {res.batch_size} x grad-accum {res.grad_accum} from now on (after out of memory)")
    return dataclasses.replace(h, heal_batch_size=res.batch_size, grad_accum=res.grad_accum)


def neutral_acts(s: Session, which: str) -> dict[int, torch.Tensor]:
    """Activations for the collapse signals (the first --pr-contexts) and the student vector (first 64)."""
    n = max(s.cfg.collapse.pr_contexts, N_STUDENT_CONTEXTS)
    layers = [*s.layers, len(models.decoder_layers(s.model)) - 1]  # the band and the final block
    with s.as_model(which):
        return extract.last_token_acts(
            s.model, s.neutral_ids[:n], layers, s.tok.pad_token_id, s.cfg.extract.extract_batch_size, "acts"
        )


def student_vector(acts: dict, base_acts: dict, layers: list[int]) -> dict[int, torch.Tensor]:
    """v_student = mean h_student(neutral) - mean h_base(neutral) at the band, last prompt token."""
    n = N_STUDENT_CONTEXTS
    return extract.mean_diff({L: acts[L][:n] for L in layers}, {L: base_acts[L][:n] for L in layers})


def collapse_signals(s: Session, which: str, acts: dict[int, torch.Tensor]) -> dict:
    """Dimensional budget, output entropy and (optionally) amplification of the unsteered model."""
    c = s.cfg.collapse
    rec = collapse.dimensional_budget({L: a[: c.pr_contexts] for L, a in acts.items()}, s.layers, max(acts))
    with s.as_model(which):
        if c.entropy_prompts > 0:
            k = min(c.entropy_prompts, len(s.contexts))
            rows = [Row(i, s.contexts[i], s.neutral_ids[i]) for i in range(k)]
            comps = s.generate(rows, seeds.derive(s.cfg.seed, "entropy"), f"entropy {which}")  # same seed every round
            pairs = [(x.prompt_ids, x.ids) for x in comps]
            rec |= collapse.output_entropy(s.model, pairs, s.tok.pad_token_id, s.cfg.heal.heal_batch_size)
        if c.amp_gauge:
            ids = s.neutral_ids[: c.amp_prompts]
            seed = seeds.derive(s.cfg.seed, "amplification")
            rec |= collapse.amplification(s.model, ids, s.layers[0], s.layers[-1], c.amp_iters, seed)
    return rec

"""steer_heal orchestrator: config -> run directory -> base eval -> rounds of stages -> report.

    uv run python -m steer_heal.run                       # default preset: embedded SmolLM2 on CPU
    uv run python -m steer_heal.run --fast-dev-run        # tiny random model, seconds
    uv run python -m steer_heal.run --reg kl_fwd --n-rounds 4 --seed 1
    uv run python -m steer_heal.run --resume out/<run>    # continue after the last completed round

Each round: extract -> generate + filter (walk-C) -> steered eval -> heal -> bake -> healed eval.
Every stage appends to <run>/events.jsonl (see events.py). Exit codes: 0 done, 2 bad input,
3 starved (too few coherent completions), 4 non-finite heal loss.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch
from loguru import logger

from steer_heal import collapse, data, events, extract, isokl, models, report
from steer_heal import filter as filt
from steer_heal.bake import adapter_name
from steer_heal.config import RunConfig, from_dict, parse_args, to_dict
from steer_heal.errors import NonFiniteLoss, OutOfMemory, Starved, UserError
from steer_heal.generate import Completion, generate
from steer_heal.heal import heal_with_retry
from steer_heal.rundir import (
    RunDir,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    load_tensors,
    safe_name,
    save_tensors,
)
from steer_heal.session import Session
from steer_heal.tokens import chat_ids

PACKAGES = ("torch", "transformers", "peft", "safetensors", "accelerate", "tyro", "gguf")
RESUMABLE_OVERRIDES = {"n_rounds", "resume", "fast_dev_run", "out_dir", "run_name"}
N_SAMPLE_PROMPTS = 3
N_STUDENT_CONTEXTS = 64  # a mean over 64 neutral prompts is enough for a cosine; the teacher uses all


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "missing"
    return out


def validate(cfg: RunConfig) -> None:
    """Reject values no stage could use, naming the flag and what is valid."""
    positive = {
        "--n-rounds": cfg.n_rounds,
        "--n-contexts": cfg.extract.n_contexts,
        "--extract-batch-size": cfg.extract.extract_batch_size,
        "--n-prompts": cfg.generate.n_prompts,
        "--max-new-tokens": cfg.generate.max_new_tokens,
        "--gen-batch-size": cfg.generate.gen_batch_size,
        "--n-keep": cfg.filter.n_keep,
        "--min-train": cfg.filter.min_train,
        "--max-collect-batches": cfg.filter.max_collect_batches,
        "--lora-r": cfg.heal.lora_r,
        "--epochs": cfg.heal.epochs,
        "--heal-batch-size": cfg.heal.heal_batch_size,
        "--grad-accum": cfg.heal.grad_accum,
        "--loss-chunk": cfg.heal.loss_chunk,
        "--eval-batch-size": cfg.eval.eval_batch_size,
        "--amp-prompts": cfg.collapse.amp_prompts,
        "--iso-kl-prompts": cfg.generate.iso_kl_prompts,
        "--amp-iters": cfg.collapse.amp_iters,
    }
    for flag, v in positive.items():
        if v < 1:
            raise UserError(f"{flag} {v} must be a positive integer")
    if cfg.eval.n_vignettes is not None and cfg.eval.n_vignettes < 1:
        raise UserError(f"--n-vignettes {cfg.eval.n_vignettes} must be a positive integer")
    if cfg.generate.iso_kl is not None and (cfg.generate.iso_kl <= 0 or cfg.generate.iso_kl_tol <= 0):
        raise UserError(
            f"--iso-kl {cfg.generate.iso_kl} and --iso-kl-tol {cfg.generate.iso_kl_tol} must be > 0 (nats; log c)"
        )
    if cfg.collapse.pr_contexts < 2:
        raise UserError(f"--pr-contexts {cfg.collapse.pr_contexts} must be >= 2 (a covariance needs two samples)")
    non_negative = {"--entropy-prompts": cfg.collapse.entropy_prompts, "--max-bad-steps": cfg.heal.max_bad_steps}
    for flag, v in non_negative.items():
        if v < 0:
            raise UserError(f"{flag} {v} must be >= 0")
    if cfg.heal.barrier_max_ratio <= 0 or not 0 <= cfg.heal.lam_warmup_frac <= 1:
        raise UserError(
            f"--barrier-max-ratio {cfg.heal.barrier_max_ratio} must be > 0 and "
            f"--lam-warmup-frac {cfg.heal.lam_warmup_frac} must lie in [0, 1]"
        )
    if cfg.eval.eval_think_tokens < 0:
        raise UserError(f"--eval-think-tokens {cfg.eval.eval_think_tokens} must be >= 0")
    if not cfg.generate.alphas or any(a <= 0 for a in cfg.generate.alphas):
        raise UserError(f"--alphas {list(cfg.generate.alphas)} must be one or more positive strengths")
    if not 0 < cfg.filter.tail_frac <= 1:
        raise UserError(f"--tail-frac {cfg.filter.tail_frac} must lie in (0, 1]")
    if not 0 < cfg.filter.kappa_floor <= 1:
        raise UserError(f"--kappa-floor {cfg.filter.kappa_floor} must lie in (0, 1]")
    if cfg.heal.lr <= 0 or cfg.heal.lam < 0 or cfg.heal.tau < 0:
        raise UserError(f"--lr {cfg.heal.lr} must be > 0 and --lam {cfg.heal.lam}, --tau {cfg.heal.tau} >= 0")


def make_run_dir(cfg: RunConfig) -> RunDir:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    model_tag = Path(cfg.model).name.replace(".gguf", "") or "model"
    name = safe_name(cfg.run_name or f"{stamp}_{model_tag}_{cfg.heal.reg}_s{cfg.seed}")
    root = Path(cfg.out_dir) / name
    if root.exists():
        raise UserError(f"run directory {root} already exists; pass another --run-name or --resume {root}")
    root.mkdir(parents=True)
    return RunDir(root)


def resolve_resume(cfg: RunConfig, argv: list[str]) -> tuple[RunConfig, RunDir]:
    """The stored config, with only n_rounds taken from the command line; refuse any other difference."""
    rd = RunDir(cfg.resume)
    stored = rd.read_config()["config"]
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    if given <= RESUMABLE_OVERRIDES:
        merged = from_dict(stored)
        merged = dataclasses.replace(
            merged, n_rounds=cfg.n_rounds if "n_rounds" in given else merged.n_rounds, resume=cfg.resume
        )
        return merged, rd
    now = to_dict(cfg)
    diff = [k for k in sorted(set(now) | set(stored)) if k not in RESUMABLE_OVERRIDES and now.get(k) != stored.get(k)]
    if diff:
        detail = "; ".join(f"{k}: run has {stored.get(k)!r}, command line gives {now.get(k)!r}" for k in diff)
        raise UserError(f"--resume {rd.root}: config differs in {detail} (only --n-rounds may change)")
    return cfg, rd


def completion_row(c: Completion, scores: dict, keep: bool, reason: str) -> dict:
    return {
        **dataclasses.asdict(c),
        "n_tokens": len(c.ids),
        "hit_cap": c.hit_cap,
        **scores,
        "keep": keep,
        "reason": reason,
    }


class Pipeline:
    """Holds what every round shares: model, tokenizer, data, run dir, events. The loop is in `run`."""

    def __init__(self, cfg: RunConfig, rd: RunDir):
        self.cfg, self.rd = cfg, rd
        self.ev = events.Events(rd.events)
        self.session = Session.from_config(cfg)
        se = self.session
        self.persona, self.contexts, self.prompts, self.prompt_ids = se.persona, se.contexts, se.prompts, se.prompt_ids
        self.vig_source, self.vigs, self.tok, self.student, self.layers = (
            se.vig_source,
            se.vigs,
            se.tok,
            se.student,
            se.layers,
        )
        # The extraction contexts with the default (neutral) system prompt, tokenised once: every round's
        # activations, entropy samples and amplification gauge read them.
        self.neutral_ids = [chat_ids(self.tok, x) for x in self.contexts]

    # ------------------------------------------------------------------ stages

    def eval(self, r: int, which: str, vectors=None, c: float = 0.0) -> dict:
        t0 = time.time()
        with self.student.base() if which == "base" else nullcontext():
            m, rows = self.session.evaluate(vectors, c, desc=f"eval {which}")
        atomic_write_jsonl(self.rd.eval_rows(r, which), rows)
        tk = self.persona.trait_key
        logger.info(f"eval r{r} {which}: {tk} {m[tk]:+.3f}, coherence {m['coherence']:.3f}, acc {m['acc']}")
        self.ev.emit("eval", r, model=which, c=c, vignettes=self.vig_source, seconds=time.time() - t0, **m)
        return m

    def calibrate(self) -> float:
        """Filter ppl threshold from the base model's own unsteered completions on the generation prompts."""
        f = self.cfg.filter
        ppl = self.session.calibration_ppls()
        th = filt.calibrate_ppl(ppl, f.ppl_mult, f.ppl_max)
        med = statistics.median(ppl)
        self.ev.emit(
            "calibrate",
            -1,
            n=len(ppl),
            base_median_ppl=med,
            ppl_mult=f.ppl_mult,
            ppl_max_override=f.ppl_max,
            ppl_max=th,
            base_ppls=ppl,
        )
        logger.info(f"filter calibration: base median tail-ppl {med:.2f} -> ppl_max {th:.2f}")
        return th

    def iso_kl(self, r: int, v: dict[int, torch.Tensor]) -> float:
        """c* with p95 KL(steered at c* || unsteered) = --iso-kl on greedy completions of the first prompts."""
        g = self.cfg.generate
        ids = self.prompt_ids[: g.iso_kl_prompts]

        def d(c: float) -> float:
            return isokl.steered_kl_p95(
                self.student.model, self.tok, ids, v, c, g.max_new_tokens, g.gen_batch_size, self.cfg.seed
            )

        t0 = time.time()
        try:
            c_star, achieved, tried = isokl.solve_log(d, g.iso_kl, tol=g.iso_kl_tol)
        except ValueError as e:
            raise UserError(f"--iso-kl {g.iso_kl}: {e}; choose a target this vector can reach") from e
        self.ev.emit("isokl", r, target=g.iso_kl, c_star=c_star, kl_p95=achieved, tried=tried, seconds=time.time() - t0)
        logger.info(f"iso-KL r{r}: c* {c_star:.3g} gives p95 KL {achieved:.3f} (target {g.iso_kl}), {len(tried)} evals")
        return c_star

    def tail_ppl(self, comps: list[Completion]) -> list[float | None]:
        return self.session.base_tail_ppl([(c.prompt_ids, c.ids) for c in comps])

    def generate_and_filter(
        self, r: int, vectors, ppl_max: float, c_star: float = 1.0
    ) -> tuple[float, list[dict], dict]:
        """Walk-C over mixed-strength batches: row coefficient = alpha x kappa x c* on the raw vector."""
        g = self.cfg.generate
        th = self.session.thresholds(ppl_max)
        persona_texts = (self.persona.pos, self.persona.neg)
        stats = {"n_generated": 0, "tokens": 0, "gen_seconds": 0.0, "filter_seconds": 0.0}
        offset = (r * 7919) % len(self.prompts)

        def probe(kappa: float, b: int) -> list[dict]:
            idx = [(offset + (b * g.n_prompts) + j) % len(self.prompts) for j in range(g.n_prompts)]
            rows = [(i, self.prompts[i], self.prompt_ids[i], a, a * kappa * c_star) for i in idx for a in g.alphas]
            t0 = time.time()
            comps = self.session.sample(rows, self.cfg.seed * 1000 + r * 50 + b, f"generate r{r} k={kappa:g}", vectors)
            stats["gen_seconds"] += time.time() - t0
            stats["n_generated"] += len(comps)
            stats["tokens"] += sum(len(c.ids) for c in comps)
            t0 = time.time()
            ppl = self.tail_ppl(comps)
            out = []
            for c, p in zip(comps, ppl):
                s = {"tail_ppl": p, "n_tokens": len(c.ids), **filt.text_scores(c.text, persona_texts)}
                keep, reason = filt.decide(s, th)
                out.append(completion_row(c, s, keep, reason) | {"kappa": kappa, "batch": b})
            stats["filter_seconds"] += time.time() - t0
            return out

        f = self.cfg.filter
        try:
            kappa, scored = filt.walk_c(
                probe, f.keep_target, f.kappa_floor, f.n_keep, f.min_train, f.max_collect_batches
            )
        except Starved as e:
            atomic_write_jsonl(self.rd.completions(r), e.scored)
            self.ev.emit(
                "filter",
                r,
                kappa=e.kappa,
                ppl_max=ppl_max,
                q0=filt.q0_table(e.scored),
                n_kept=sum(s["keep"] for s in e.scored),
                n_scored=len(e.scored),
                starved=True,
            )
            raise
        atomic_write_jsonl(self.rd.completions(r), scored)
        q0 = filt.q0_table(scored)
        tps = stats["tokens"] / max(stats["gen_seconds"], 1e-9)
        self.ev.emit(
            "generate",
            r,
            n=stats["n_generated"],
            tokens=stats["tokens"],
            tokens_per_s=tps,
            seconds=stats["gen_seconds"],
            alphas=list(g.alphas),
            kappa=kappa,
            hit_cap_frac=sum(s["hit_cap"] for s in scored) / len(scored),
        )
        kept = [s for s in scored if s["keep"]]
        samples = _near_threshold(scored, ppl_max)
        self.ev.emit(
            "filter",
            r,
            kappa=kappa,
            ppl_max=ppl_max,
            q0=q0,
            n_kept=len(kept),
            n_scored=len(scored),
            seconds=stats["filter_seconds"],
            samples=samples,
            starved=False,
        )
        logger.info(
            f"filter r{r} (kappa {kappa:g}, ppl_max {ppl_max:.1f}): "
            f"kept {len(kept)}/{len(scored)}\n{filt.format_q0(q0)}"
        )
        return kappa, kept, stats

    def samples(self, vectors, c: float) -> list[dict]:
        """Greedy completions for a few fixed prompts (steered if vectors are given)."""
        g = self.cfg.generate
        rows = [(i, self.prompts[i], self.prompt_ids[i], c, c) for i in range(min(N_SAMPLE_PROMPTS, len(self.prompts)))]
        comps = generate(
            self.student.model,
            self.tok,
            rows,
            vectors,
            g.max_new_tokens,
            1.0,
            1.0,
            g.gen_batch_size,
            0,
            do_sample=False,
            desc="samples",
        )
        return [{"prompt": x.prompt, "text": x.text} for x in comps]

    def neutral_acts(self, which: str) -> dict[int, torch.Tensor]:
        """Last-prompt-token block outputs over the neutral prompts, at the band and the final block."""
        n = max(self.cfg.collapse.pr_contexts, N_STUDENT_CONTEXTS)  # PR uses the first pr_contexts of them
        ids = self.neutral_ids[:n]
        layers = [*self.layers, len(models.decoder_layers(self.student.model)) - 1]
        with self.student.base() if which == "base" else nullcontext():
            return extract.last_token_acts(
                self.student.model, ids, layers, self.tok.pad_token_id, self.cfg.extract.extract_batch_size, "acts"
            )

    def collapse_signals(self, r: int, which: str, acts: dict[int, torch.Tensor]) -> dict:
        """Dimensional budget, output entropy and (optionally) amplification of the unsteered model."""
        c = self.cfg.collapse
        t0 = time.time()
        final = max(acts)
        rec = collapse.dimensional_budget({L: a[: c.pr_contexts] for L, a in acts.items()}, self.layers, final)
        with self.student.base() if which == "base" else nullcontext():
            if c.entropy_prompts > 0:
                k = min(c.entropy_prompts, len(self.contexts))
                rows = [(i, self.contexts[i], self.neutral_ids[i], 0.0, 0.0) for i in range(k)]
                # the same seed every round: only the weights differ
                comps = self.session.sample(rows, self.cfg.seed * 1000 + 999, f"entropy {which}")
                rec |= collapse.output_entropy(
                    self.student.model,
                    [(x.prompt_ids, x.ids) for x in comps],
                    self.tok.pad_token_id,
                    self.cfg.heal.heal_batch_size,
                )
            if c.amp_gauge:
                rec |= collapse.amplification(
                    self.student.model,
                    self.neutral_ids[: c.amp_prompts],
                    self.layers[0],
                    self.layers[-1],
                    c.amp_iters,
                    self.cfg.seed,
                )
        rec["seconds"] = time.time() - t0
        self.ev.emit("collapse", r, model=which, **rec)
        amp = f", amp {rec['amp']:.3f}" if rec.get("amp") is not None else ""
        ent = f", entropy {rec['entropy_mean']:.3f} (p5 {rec['entropy_p5']:.3f})" if rec.get("entropy_mean") else ""
        logger.info(f"collapse r{r} {which}: PR band {rec['pr_band']:.2f}, PR final {rec['pr_final']:.2f}{ent}{amp}")
        return rec

    @staticmethod
    def student_vector(student_acts: dict, base_acts: dict, layers: list[int]) -> dict[int, torch.Tensor]:
        """v_student = mean h_student(neutral) - mean h_base(neutral) at the band, last prompt token."""
        n = N_STUDENT_CONTEXTS
        return extract.mean_diff({L: student_acts[L][:n] for L in layers}, {L: base_acts[L][:n] for L in layers})


def _near_threshold(scored: list[dict], ppl_max: float, k: int = 2) -> dict:
    """A few kept and dropped completions whose tail-ppl is closest to the threshold (for eyeballing)."""

    def pick(rows):
        rows = sorted((r for r in rows if r["tail_ppl"] is not None), key=lambda r: abs(r["tail_ppl"] - ppl_max))[:k]
        return [
            {"alpha": r["alpha"], "tail_ppl": r["tail_ppl"], "reason": r["reason"], "text": r["text"][:300]}
            for r in rows
        ]

    return {"kept": pick([r for r in scored if r["keep"]]), "dropped": pick([r for r in scored if not r["keep"]])}


def run(cfg: RunConfig, argv: list[str] | None = None, poison: tuple[int, int] | None = None) -> int:
    """Run (or resume) the loop. `poison=(round, step)` makes the heal NLL NaN from that step on (tests only)."""
    argv = sys.argv[1:] if argv is None else argv
    validate(cfg)
    resuming = cfg.resume is not None
    if resuming:
        cfg, rd = resolve_resume(cfg, argv)
    else:
        rd = make_run_dir(cfg)
    persona = data.persona(
        cfg.extract.persona, cfg.extract.persona_pos, cfg.extract.persona_neg, cfg.extract.personas_file
    )
    if not resuming:
        meta = {
            "config": to_dict(cfg),
            "argv": argv,
            "git_commit": git_commit(),
            "versions": versions(),
            "trait_key": persona.trait_key,
            "trait_sign": persona.sign,
            "coh_floor": cfg.coh_floor,
        }
        atomic_write_json(rd.config, meta)  # first artifact: the run describes itself
        events.Events(rd.events).emit("config", -1, **meta)
    logger.add(rd.root / "run.log", level="INFO", enqueue=False)
    logger.info(f"run directory {rd.root}")
    t_run = time.time()
    pipe = Pipeline(cfg, rd)
    ev = pipe.ev
    done = rd.completed_rounds()
    if resuming:
        start = done[-1] + 1 if done else 0
        _truncate_events(rd, start)
        for r in done:
            pipe.student.load_adapter(r, rd.adapter(r))
        last = [x for x in events.read(rd.events, "round") if x["round"] == done[-1]] if done else []
        if last and not (last[0].get("healed_coh") or 0) >= cfg.coh_floor:
            logger.warning(
                f"round {done[-1]} ended below the coherence floor ({last[0].get('healed_coh')} < "
                f"{cfg.coh_floor}); continuing from that student, as asked"
            )
        ev.emit("resume", start, completed=done)
        logger.info(f"resuming after round {done[-1] if done else '-'}; {len(done)} adapters re-attached")
    else:
        start = 0
    recs = events.read(rd.events)
    base = next((x for x in recs if x["stage"] == "eval" and x.get("model") == "base"), None)
    base = base or pipe.eval(-1, "base")
    cal = next((x for x in recs if x["stage"] == "calibrate"), None)
    ppl_max = cal["ppl_max"] if cal else pipe.calibrate()
    base_acts = pipe.neutral_acts("base")
    if not any(x["stage"] == "collapse" and x.get("model") == "base" for x in recs):
        pipe.collapse_signals(-1, "base", base_acts)
    v0 = {int(k): v for k, v in load_tensors(rd.vector(0)).items()} if start > 0 else None
    tk = persona.trait_key
    stop_reason, code = None, 0
    heal_cfg = cfg.heal
    for r in range(start, cfg.n_rounds):
        secs: dict[str, float] = {}
        t0 = time.time()
        v = extract.teacher_vector(
            pipe.student.model,
            pipe.tok,
            persona,
            pipe.contexts,
            pipe.layers,
            cfg.extract.extract_batch_size,
            cfg.extract.normalize,
        )
        v0 = v0 or v
        save_tensors(
            rd.vector(r),
            {str(L): x for L, x in v.items()},
            {
                "model": cfg.model,
                "layers": json.dumps(pipe.layers),
                "persona": persona.name,
                "pos": persona.pos,
                "neg": persona.neg,
                "n_contexts": str(len(pipe.contexts)),
                "round": str(r),
                "normalized": str(cfg.extract.normalize),
            },
        )
        cos_v0 = extract.cosine(v, v0)
        secs["extract"] = time.time() - t0
        ev.emit(
            "extract",
            r,
            layers=pipe.layers,
            norm=extract.norm(v),
            per_layer_norm={L: float(x.norm()) for L, x in v.items()},
            cos_v0=cos_v0,
            n_contexts=len(pipe.contexts),
            seconds=secs["extract"],
        )
        logger.info(f"extract r{r}: layers {pipe.layers}, |v| {extract.norm(v):.2f}, cos(v, v0) {cos_v0:.3f}")
        c_star = 1.0
        if cfg.generate.iso_kl is not None:  # alphas (and the eval strength) become multiples of c*
            t0 = time.time()
            c_star = pipe.iso_kl(r, v)
            secs["iso_kl"] = time.time() - t0
        try:
            kappa, kept, gstats = pipe.generate_and_filter(r, v, ppl_max, c_star)
        except Starved as e:
            stop_reason, code = f"starved at round {r}: {str(e).splitlines()[0]}", 3
            logger.error(str(e))
            break
        except OutOfMemory as e:
            stop_reason, code = str(e), 2
            logger.error(f"{e}; rounds before {r} are intact in {rd.root}")
            break
        secs["generate"], secs["filter"] = gstats["gen_seconds"], gstats["filter_seconds"]
        c_eval = (
            cfg.eval.eval_alpha if cfg.eval.eval_alpha is not None else statistics.median(cfg.generate.alphas) * kappa
        )
        t0 = time.time()
        c_eval *= c_star  # on the raw vector, as every eval record states it
        steered = pipe.eval(r, "steered", v, c_eval)
        steered_samples = pipe.samples(v, c_eval)
        secs["eval_steered"] = time.time() - t0
        pairs = [(s["prompt_ids"], s["ids"]) for s in kept]
        try:
            res = heal_with_retry(
                pipe.student,
                pairs,
                heal_cfg,
                r,
                cfg.seed,
                pipe.tok.pad_token_id,
                emit=lambda r=r, **kw: ev.emit("heal_step", r, **kw),
                poison_step=poison[1] if poison and poison[0] == r else None,
            )
        except NonFiniteLoss as e:
            pipe.student.drop_training()
            stop_reason, code = str(e), 4
            logger.error(f"{e}; rounds before {r} are intact in {rd.root}")
            break
        except OutOfMemory as e:
            stop_reason, code = str(e), 2
            logger.error(f"{e}; rounds before {r} are intact in {rd.root}")
            break
        if res.batch_size != heal_cfg.heal_batch_size:  # an OOM retry halved it: keep that for later rounds
            heal_cfg = dataclasses.replace(heal_cfg, heal_batch_size=res.batch_size, grad_accum=res.grad_accum)
        secs["heal"] = res.seconds
        ev.emit(
            "heal",
            r,
            **dataclasses.asdict(res),
            n_train=len(pairs),
            reg=cfg.heal.reg,
            lam=cfg.heal.lam,
            tau=cfg.heal.tau,
            kl_agg=cfg.heal.kl_agg,
            barrier_ref=cfg.heal.barrier_ref,
        )
        t0 = time.time()
        name = pipe.student.bake()
        pipe.student.save_adapter(name, rd.adapter(r))
        secs["bake"] = time.time() - t0
        ev.emit("bake", r, adapter=str(rd.adapter(r).relative_to(rd.root)), stack=list(pipe.student.baked))
        t0 = time.time()
        healed = pipe.eval(r, "healed")
        healed_samples = pipe.samples(None, 0.0)
        secs["eval_healed"] = time.time() - t0
        t0 = time.time()
        acts = pipe.neutral_acts("healed")
        vs = pipe.student_vector(acts, base_acts, pipe.layers)
        col = pipe.collapse_signals(r, "healed", acts)
        secs["collapse"] = time.time() - t0
        atomic_write_json(
            rd.round(r) / "samples.json",
            [
                {"prompt": s["prompt"], "steered": s["text"], "healed": h["text"]}
                for s, h in zip(steered_samples, healed_samples)
            ],
        )
        d = report.deltas(base, steered, healed, tk)
        rec = ev.emit(
            "round",
            r,
            steered_trait=steered[tk],
            healed_trait=healed[tk],
            steered_coh=steered["coherence"],
            healed_coh=healed["coherence"],
            base_trait=base[tk],
            base_coh=base["coherence"],
            **d,
            c_eval=c_eval,
            c_star=c_star,
            cos_v0=cos_v0,
            cos_student_teacher=extract.cosine(vs, v),
            norm_v=extract.norm(v),
            norm_student=extract.norm(vs),
            kappa=kappa,
            n_generated=gstats["n_generated"],
            n_kept=len(kept),
            heal_nll=res.nll_last,
            heal_d=res.d_mean,
            barrier_fired=res.fired_frac,
            barrier_skipped=res.barrier_skipped,
            steps_skipped=res.steps_skipped,
            **{k: col.get(k) for k in collapse.SIGNALS | {"erank_band": -1}},
            seconds=secs,
        )
        atomic_write_text(rd.done(r), json.dumps({"round": r, "ts": rec["ts"]}) + "\n")  # the round is complete
        logger.info(
            f"round {r}: {tk} steered {steered[tk]:+.3f} healed {healed[tk]:+.3f} (base {base[tk]:+.3f}), "
            f"coherence {healed['coherence']:.3f}, retain {d['retain']}"
        )
        if not (healed["coherence"] >= cfg.coh_floor):
            stop_reason = f"healed coherence {healed['coherence']:.3f} < floor {cfg.coh_floor} at round {r}"
            logger.warning(stop_reason)
            break
    if stop_reason:
        ev.emit("stop", r, reason=stop_reason, code=code)
    if rd.completed_rounds():
        adapters = {adapter_name(r): rd.adapter(r) / adapter_name(r) for r in rd.completed_rounds()}
        pipe.student.export(pipe.tok, rd.export, adapters)
    rep = report.build(rd.root)
    ev.emit("summary", -1, verdict=rep["verdict"], seconds=time.time() - t_run, rounds_done=len(rd.completed_rounds()))
    report.append_ledger(
        Path(cfg.out_dir) / "results.jsonl", report.ledger_row(report.collect(rd.root), rep["verdict"], rd.root)
    )
    print("\n" + rep["table"] + "\n\nfilter (Q0):\n" + rep["q0"] + "\n\ncollapse signals:\n" + rep["collapse"] + "\n")
    expect = (
        f"PASS: trait moves in the persona's direction (sign {persona.sign:+d}) with coherence >= {cfg.coh_floor:.2f}"
    )
    logger.info(f"expected: {expect}")
    print(f"{rep['verdict']}\nrun directory: {rd.root}  ({time.time() - t_run:.0f} s)")
    return code


def _truncate_events(rd: RunDir, start: int) -> None:
    """Drop records of rounds >= start (an interrupted round will run again) so no round is duplicated."""
    keep = [r for r in events.read(rd.events) if r["round"] < start and r["stage"] not in ("summary", "stop")]
    atomic_write_jsonl(rd.events, keep)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logger.remove()
    logger.add(sys.stderr, level="INFO", format="<green>{time:HH:mm:ss}</green> {level: <7} {message}")
    _quiet_third_party()
    try:
        cfg = parse_args(argv)
        return run(cfg, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _quiet_third_party() -> None:
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


if __name__ == "__main__":
    sys.exit(main())

"""Heal: train a fresh LoRA adapter on kept completions (no steering) under a divergence barrier.

    loss = main + lambda_r * mean_i relu(D_i - tau) + spectral_lam * sum sigma_max(Delta W)
    main = NLL(completion tokens)                                   (--heal-target sft)
         | mean over trusted positions of KL(teacher || student)    (kl_teacher: steering baking)
         | (1 - w) NLL + w KL(teacher || student)                   (mix)
    D_i  = aggregation (mean | rmse | p95 | max) over completion i of per-position KL(student || ref)
           (kl_rev) or KL(ref || student) (kl_fwd); `nll` = no barrier.

The teacher is free: the same weights as the student before this round (`student.prev()`), with c*v
added at each completion's own strength, under no_grad. Its whole next-token distribution is the target,
rebuilt per chunk from its hidden states, or cached once per round as its top-k tokens plus a tail
bucket (`--teacher-topk`). Positions where the teacher's KL to the original model exceeds
`--trust-kl-max` (where it has itself gone incoherent) are left out of the target (`prepare`).

The loop is three parts: `loss_terms` (one micro-batch's terms), `Safety` (what may train) and
`optimizer_step`. Safety check, per micro-batch: a non-finite NLL or spectral term skips the whole
micro-batch; a non-finite barrier, or one larger than `barrier_max_ratio` x NLL, is dropped for that
micro-batch and the SFT step goes on. Both are counted and warned about once; more than
`max_bad_steps` skipped micro-batches in a round raise NonFiniteLoss (the weights have most likely
diverged). `lam_warmup_frac` ramps lambda linearly from 0 over the first part of the round.

The reference logits come from the same model with adapters switched off (`base`) or with only the
already-baked adapters on (`prev`), never from a second copy of the model. The adapter starts at B = 0,
so D = 0 at step 0. A heal that fails for any reason discards its adapter: the student is as before.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from loguru import logger
from peft import LoraConfig
from tqdm.auto import tqdm

from steer_heal import losses, seeds
from steer_heal.config import HealConfig
from steer_heal.errors import NonFiniteLoss, OutOfMemory, Starved, free_memory
from steer_heal.hooks import steer
from steer_heal.losses import (
    KL,
    aggregate,
    completion_batch,
    completion_terms,
    cosine_warmup,
    hinge,
    lam_at_round,
    lm_logits,
    selected_hidden,
    spectral_norm_lowrank,
)
from steer_heal.models import input_device, unwrap
from steer_heal.records import recorded
from steer_heal.student import Student, lora_targets
from steer_heal.tokens import batches


@dataclass
class HealResult:
    """What a heal did: the `heal` event stores every field; the round record the `recorded` ones."""

    adapter: str
    steps: int
    nll_first: float = recorded("heal_nll_first")  # the first good micro-batch's completion NLL
    nll_last: float = recorded("heal_nll")  # the last good micro-batch's completion NLL, nats per token
    d_mean: float = recorded("heal_d")  # the divergence D under the barrier, mean over good micro-batches
    fired_frac: float = recorded("barrier_fired")  # share of good micro-batches whose barrier was above 0
    grad_ratio_mean: float | None
    seconds: float
    barrier_skipped: int = recorded(default=0)  # micro-batches whose runaway barrier the safety check dropped
    steps_skipped: int = recorded(default=0)  # micro-batches (or group updates) skipped as non-finite
    batch_size: int = 0
    grad_accum: int = 0
    target: str = "sft"
    kd_first: float | None = None  # the distillation KL (kl_teacher / mix), first and last good micro-batch
    kd_last: float | None = None
    masked_share: float | None = None  # share of completion positions left out by --trust-kl-max


@dataclass
class SteeredTeacher:
    """The round's teacher: the student before the round, steered by c_i * vectors on completion i."""

    vectors: dict[int, torch.Tensor]
    coeffs: list[float]  # one per training completion: the strength it was generated at


@dataclass
class Prepared:
    """Per training completion: its teacher coefficient, trusted positions and (top-k mode) cached targets."""

    coeffs: list[float]
    mask: list[torch.Tensor] | None  # bool [n_i] per completion; None = all trusted
    topk: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None  # (idx, lp, tail) per completion
    masked_share: float | None


def target_weight(cfg: HealConfig) -> float:
    """w in main = (1 - w) NLL + w KL(teacher || student): 0 for sft, 1 for kl_teacher."""
    return {"sft": 0.0, "kl_teacher": 1.0, "mix": cfg.mix_weight}[cfg.heal_target]


def lora_config(student: Student, cfg: HealConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=lora_targets(student.model, cfg.lora_layers, cfg.lora_targets),
        init_lora_weights=True,  # A random, B = 0: the fresh adapter is exactly the reference
    )


# ---------------------------------------------------------------- the parts


@dataclass
class Terms:
    """One micro-batch's loss terms (scalars) and its per-completion divergence d [B]. `main` is what the
    adapter learns (the NLL for sft); `kd` the distillation KL (None for sft)."""

    nll: torch.Tensor
    barrier: torch.Tensor
    spectral: torch.Tensor
    d: torch.Tensor
    main: torch.Tensor | None = None
    kd: torch.Tensor | None = None
    empty: bool = False  # kl_teacher with every position of the micro-batch outside --trust-kl-max

    def __post_init__(self):
        self.main = self.nll if self.main is None else self.main

    def total(self) -> torch.Tensor:
        return self.main + self.barrier + self.spectral

    def __str__(self) -> str:  # formatted only for a warning or an error: each .item() is a GPU sync
        kd = "" if self.kd is None else f", kd={self.kd.item():.4g}"
        return f"nll={self.nll.item():.4g}{kd}, barrier={self.barrier.item():.4g}, spectral={self.spectral.item():.4g}"


def teacher_targets(student: Student, batch: dict, idx: list[int], teacher: SteeredTeacher, prep: Prepared):
    """A micro-batch's distillation targets (losses.Teacher) and trusted-position mask [K] (None = all):
    the cached top-k, or the steered teacher's hidden states now (the student before this round, each
    completion steered at its own strength)."""
    dev = batch["targets"].device
    mask = None if prep.mask is None else torch.cat([prep.mask[i] for i in idx]).to(dev)
    if prep.topk is not None:
        idx_, lp, tail = (torch.cat([prep.topk[i][j] for i in idx]).to(dev) for j in range(3))
        return losses.Teacher(idx=idx_, lp=lp, tail=tail), mask
    coeff = torch.tensor([prep.coeffs[i] for i in idx], dtype=torch.float32, device=dev)
    with torch.no_grad(), student.prev(), steer(student.model, teacher.vectors, coeff):
        return losses.Teacher(h=selected_hidden(student.model, batch)), mask


def loss_terms(student: Student, name: str, batch: dict, cfg: HealConfig, lam: float, distill=None) -> Terms:
    """The main term (NLL over the completion tokens, or the distillation KL to the steered teacher over
    the trusted positions, or a mix), the barrier lam * mean relu(D - tau) against the reference, and the
    spectral penalty of adapter `name`. `distill` = (targets, trusted mask [K] or None) when w > 0. The
    reference and teacher hidden states are taken without gradient."""
    model, n = student.model, batch["enc"]["input_ids"].shape[0]
    zero = torch.zeros((), device=batch["targets"].device)
    h_ref = None
    if cfg.reg != "nll":
        ref = student.base if cfg.barrier_ref == "base" else student.prev
        with torch.no_grad(), ref():
            h_ref = selected_hidden(model, batch)
    h = selected_hidden(model, batch)
    targets, mask = distill if distill is not None else (None, None)
    pos = completion_terms(model, h, batch["targets"], h_ref, KL.get(cfg.reg), cfg.loss_chunk, targets)
    d, barrier = torch.zeros(n, device=zero.device), zero
    if pos.kl is not None:
        d = aggregate(pos.kl, batch["seg"], n, cfg.kl_agg)
        barrier = hinge(d, cfg.tau, lam)
    spectral = zero
    if cfg.spectral_lam > 0:
        spectral = cfg.spectral_lam * sum(spectral_norm_lowrank(A, B, s) for A, B, s in student.lora_factors(name))
    nll = -pos.tok.mean()
    if pos.kd is None:
        return Terms(nll, barrier, spectral, d)
    w = target_weight(cfg)
    if mask is not None and not mask.any():  # nothing trusted here: no distillation signal in this micro-batch
        return Terms(nll, barrier, spectral, d, main=(1 - w) * nll, kd=zero, empty=w == 1.0)
    kd = pos.kd[mask].mean() if mask is not None else pos.kd.mean()
    main = kd if w == 1.0 else (1 - w) * nll + w * kd
    return Terms(nll, barrier, spectral, d, main=main, kd=kd)


@torch.no_grad()
def prepare(student: Student, pairs, cfg: HealConfig, teacher: SteeredTeacher, pad_id: int) -> Prepared:
    """One pass over the training completions before the adapter exists: the trusted positions (teacher's
    KL to the original model within --trust-kl-max) and, with --teacher-topk, the cached top-k targets."""
    if len(teacher.coeffs) != len(pairs):
        raise ValueError(f"{len(teacher.coeffs)} teacher coefficients for {len(pairs)} completions")
    if not pairs:
        raise Starved("no training completions to distil (every on-policy sample was rejected?)")
    if cfg.trust_kl_max is None and cfg.teacher_topk is None:
        return Prepared(teacher.coeffs, None, None, None)
    model, dev = student.model, input_device(student.model)
    masks, topk = [], []
    for idx in batches(list(range(len(pairs))), cfg.heal_batch_size):
        batch = completion_batch([pairs[i] for i in idx], pad_id, dev)
        coeff = torch.tensor([teacher.coeffs[i] for i in idx], dtype=torch.float32, device=dev)
        with student.prev(), steer(model, teacher.vectors, coeff):
            h_t = selected_hidden(model, batch)
        h_o = None
        if cfg.trust_kl_max is not None:
            with student.base():
                h_o = selected_hidden(model, batch)
        keep, tk = [], []
        for i in range(0, h_t.shape[0], cfg.loss_chunk):
            logp_t = torch.log_softmax(lm_logits(model, h_t[i : i + cfg.loss_chunk]), -1)
            if h_o is not None:
                logp_o = torch.log_softmax(lm_logits(model, h_o[i : i + cfg.loss_chunk]), -1)
                keep.append(losses.kl_fwd(logp_o, logp_t) <= cfg.trust_kl_max)  # KL(teacher || original)
            if cfg.teacher_topk is not None:
                tk.append(losses.topk_targets(logp_t, cfg.teacher_topk))
        seg = batch["seg"]
        keep_all = torch.cat(keep) if keep else None
        parts = [torch.cat([t[j] for t in tk]) for j in range(3)] if tk else None
        for j in range(len(idx)):
            sel = seg == j
            masks.append(None if keep_all is None else keep_all[sel].cpu())
            topk.append(None if parts is None else tuple(p[sel].cpu() for p in parts))
    n = sum(len(p[1]) for p in pairs)
    share = None if masks[0] is None else 1 - sum(int(m.sum()) for m in masks) / n
    if share == 1.0:
        raise Starved(
            f"--trust-kl-max {cfg.trust_kl_max}: the steered teacher's KL to the original model exceeds it at "
            f"every one of the {n} completion positions, so there is nothing to distil; raise it or lower the dose"
        )
    return Prepared(teacher.coeffs, masks if masks[0] is not None else None,
                    topk if topk[0] is not None else None, share)  # fmt: skip


class Safety:
    """The heal safety check's accounting for one round: what may train, what was skipped."""

    def __init__(self, round: int, cfg: HealConfig):
        self.round, self.max_bad, self.max_ratio = round, cfg.max_bad_steps, cfg.barrier_max_ratio
        self.skipped = 0  # micro-batches (or group updates) skipped as non-finite
        self.barrier_dropped = 0  # micro-batches whose barrier was dropped

    def admit(self, t: Terms, step: int) -> tuple[bool, Terms]:
        """(may this micro-batch train, its terms with a runaway barrier dropped)."""
        if not bool(torch.isfinite(t.nll) and torch.isfinite(t.main) and torch.isfinite(t.spectral)):
            self.skip(f"non-finite loss ({t})", step)
            return False, t
        if not torch.isfinite(t.barrier) or t.barrier.item() > self.max_ratio * t.nll.item():
            self.barrier_dropped += 1
            if self.barrier_dropped == 1:
                logger.warning(
                    f"heal r{self.round} step {step}: barrier dropped for this micro-batch ({t}; limit "
                    f"{self.max_ratio:g} x nll); counted in the round record, warned once"
                )
            t = dataclasses.replace(t, barrier=torch.zeros_like(t.nll))
        return True, t

    def skip(self, why: str, step: int) -> None:
        """Count a skipped micro-batch (or group update); past --max-bad-steps the weights have diverged."""
        self.skipped += 1
        if self.skipped > self.max_bad:
            raise NonFiniteLoss(
                f"heal r{self.round} step {step}: {why}; {self.skipped} micro-batches skipped, "
                f"more than --max-bad-steps {self.max_bad}"
            )
        if self.skipped == 1:
            logger.warning(f"heal r{self.round} step {step}: {why}; skipped (counted in the round record, warned once)")


def optimizer_step(opt, params: list[torch.Tensor], n_ok: int, lr: float, max_grad_norm: float) -> torch.Tensor:
    """Average the gradients summed over the group's n_ok good micro-batches, clip, and step at `lr`.
    Returns the gradient norm; when it is non-finite no update is made."""
    for p in params:
        if p.grad is not None:
            p.grad.div_(n_ok)
    gnorm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if torch.isfinite(gnorm):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
    return gnorm


def plan(n: int, cfg: HealConfig, rng: random.Random) -> list[list[list[int]]]:
    """Optimiser steps as groups of micro-batches (example indices): each epoch's shuffled order cut into
    micro-batches, grouped `grad_accum` at a time across epoch boundaries; a short last group still steps."""
    micro = []
    for _ in range(cfg.epochs):
        order = list(range(n))
        rng.shuffle(order)
        micro += list(batches(order, cfg.heal_batch_size))
    return [micro[i : i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]


def lam_ramp(step: int, total: int, warmup_frac: float) -> float:
    """Barrier warm-up multiplier: step / (warmup_frac * total), capped at 1 (1 throughout when off)."""
    return min(1.0, step / (warmup_frac * total)) if warmup_frac > 0 else 1.0


def grad_ratio(t: Terms, params: list[torch.Tensor]) -> float:
    """|grad barrier| / |grad main| over the adapter: two extra backward passes through the kept graph."""

    def norm(loss):
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return math.sqrt(sum(float((x.float() ** 2).sum()) for x in g if x is not None))

    gn = norm(t.main)
    return norm(t.barrier) / max(gn, 1e-12)


@contextmanager
def training(model, grad_checkpoint: bool):
    """train() for the heal (dropout is 0, so it documents intent), optionally with block checkpointing
    (keep only block inputs; recompute each block in the backward); eval() again afterwards."""
    model.train()
    if grad_checkpoint:
        unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.eval()
        if grad_checkpoint:
            unwrap(model).gradient_checkpointing_disable()


@dataclass
class Trace:
    """Per good micro-batch: NLL, mean divergence, whether the barrier fired; grad ratios when measured."""

    nll: list[float] = field(default_factory=list)
    kd: list[float] = field(default_factory=list)
    d: list[float] = field(default_factory=list)
    fired: list[bool] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    def add(self, t: Terms, fired: bool) -> None:
        self.nll.append(t.nll.item())
        if t.kd is not None:
            self.kd.append(t.kd.item())
        self.d.append(t.d.mean().item())
        self.fired.append(fired)


# ---------------------------------------------------------------- the loop


def heal(
    student: Student, pairs: list[tuple[list[int], list[int]]], cfg: HealConfig, round: int, seed: int, pad_id: int,
    emit=None, log_every: int = 5, teacher: SteeredTeacher | None = None,
) -> HealResult:  # fmt: skip
    """Train adapter r<round> on (prompt ids, completion ids) pairs; `emit(**fields)` writes a heal_step
    event every `log_every` steps; `teacher` (needed by kl_teacher / mix) is the round's steered teacher.
    On any failure the adapter is discarded and the error re-raised."""
    prep = None
    if target_weight(cfg) > 0:
        if teacher is None:
            raise ValueError(f"--heal-target {cfg.heal_target} needs the round's steered teacher")
        prep = prepare(student, pairs, cfg, teacher, pad_id)  # before the adapter exists: the teacher is prev
    torch.manual_seed(seeds.derive(seed, "heal_init", round))
    name = student.add_adapter(round, lora_config(student, cfg))
    job = Job(student, name, pairs, cfg, round, seed, pad_id, emit, log_every, teacher, prep)
    try:
        return _train(job)
    except BaseException:
        student.drop_training()
        raise


@dataclass
class Job:
    """Everything one heal needs, in one place."""

    student: Student
    name: str
    pairs: list
    cfg: HealConfig
    round: int
    seed: int
    pad_id: int
    emit: object
    log_every: int
    teacher: SteeredTeacher | None
    prep: Prepared | None


def _micro_batch(job: Job, idx: list[int], lam: float, dev) -> Terms:
    """The loss terms of one micro-batch (with its distillation targets when the target needs them)."""
    batch = completion_batch([job.pairs[i] for i in idx], job.pad_id, dev)
    distill = teacher_targets(job.student, batch, idx, job.teacher, job.prep) if job.prep else None
    return loss_terms(job.student, job.name, batch, job.cfg, lam, distill)


def _train(job: Job) -> HealResult:
    cfg, r = job.cfg, job.round
    params = job.student.trainable()
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    groups = plan(len(job.pairs), cfg, random.Random(seeds.derive(job.seed, "heal_order", r)))
    total, warm = len(groups), max(1, int(cfg.warmup_frac * len(groups)))
    lam_r, dev = lam_at_round(cfg.lam, r, cfg.lam_round_pow), input_device(job.student.model)
    safety, trace, t0 = Safety(r, cfg), Trace(), time.time()
    with training(job.student.model, cfg.grad_checkpoint), tqdm(total=total, desc=f"heal r{r}", leave=False) as bar:
        for step, group in enumerate(groups):
            lam, n_ok, ratio = lam_r * lam_ramp(step, total, cfg.lam_warmup_frac), 0, None
            for idx in group:
                t = _micro_batch(job, idx, lam, dev)
                if t.empty:  # every position beyond --trust-kl-max: nothing to learn, nothing wrong
                    continue
                ok, t = safety.admit(t, step)
                fired = ok and bool(t.barrier.detach() > 0)
                ratio = grad_ratio(t, params) if fired and step % job.log_every == 0 else None
                if ok:  # a skipped micro-batch adds no gradient
                    t.total().backward()  # summed over the group; averaged in optimizer_step
                    n_ok += 1
                    trace.add(t, fired)
                if ratio is not None:
                    trace.ratios.append(ratio)
            lr = cfg.lr * cosine_warmup(step, total, warm)
            if n_ok:
                gnorm = optimizer_step(opt, params, n_ok, lr, cfg.max_grad_norm)
                if not torch.isfinite(gnorm):  # finite loss, non-finite gradient (e.g. a backward overflow)
                    safety.skip(f"non-finite gradient norm {gnorm.item()} ({t})", step)
            opt.zero_grad(set_to_none=True)
            if job.emit is not None and (step % job.log_every == 0 or step == total - 1):
                kd = {} if t.kd is None else {"kd": t.kd.item()}
                job.emit(step=step, nll=t.nll.item(), **kd, d=t.d.mean().item(), barrier=t.barrier.item(),
                         spectral=t.spectral.item(), fired=fired, grad_ratio=ratio, lr=lr,
                         barrier_skipped=safety.barrier_dropped, steps_skipped=safety.skipped)  # fmt: skip
            bar.update(1)
            bar.set_postfix(nll=f"{t.nll.item():.3f}", D=f"{t.d.mean().item():.3f}")
    return _result(job, params, total, trace, safety, time.time() - t0)


def _result(job: Job, params, steps: int, trace: Trace, safety: Safety, seconds: float) -> HealResult:
    """Check the adapter is usable, log the round's line, and summarise it."""
    cfg, r = job.cfg, job.round
    if not trace.nll:
        raise NonFiniteLoss(f"heal r{r}: every micro-batch was skipped as non-finite")
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise NonFiniteLoss(f"heal r{r}: the adapter has non-finite weights after {steps} steps")
    d_mean, fired = sum(trace.d) / len(trace.d), sum(trace.fired) / len(trace.fired)
    kd = f", kd {trace.kd[0]:.3f} -> {trace.kd[-1]:.3f}" if trace.kd else ""
    masked = job.prep.masked_share if job.prep else None
    logger.info(
        f"heal r{r} ({cfg.heal_target}): {steps} steps, nll {trace.nll[0]:.3f} -> {trace.nll[-1]:.3f}{kd}, "
        f"D mean {d_mean:.3f}, barrier fired {fired:.0%}, skipped: barrier {safety.barrier_dropped}, "
        f"micro-batches {safety.skipped}" + (f", positions masked {masked:.1%}" if masked is not None else "")
    )
    return HealResult(
        adapter=job.name,
        steps=steps,
        nll_first=trace.nll[0],
        nll_last=trace.nll[-1],
        d_mean=d_mean,
        fired_frac=fired,
        grad_ratio_mean=sum(trace.ratios) / len(trace.ratios) if trace.ratios else None,
        seconds=seconds,
        barrier_skipped=safety.barrier_dropped,
        steps_skipped=safety.skipped,
        batch_size=cfg.heal_batch_size,
        grad_accum=cfg.grad_accum,
        target=cfg.heal_target,
        kd_first=trace.kd[0] if trace.kd else None,
        kd_last=trace.kd[-1] if trace.kd else None,
        masked_share=masked,
    )


def heal_with_retry(student: Student, pairs, cfg: HealConfig, round: int, seed: int, pad_id: int, emit=None,
                    teacher: SteeredTeacher | None = None):  # fmt: skip
    """`heal`, and on out-of-memory once more from a fresh adapter with half the micro-batch and twice the
    accumulation (the same examples per optimiser step). A second out-of-memory raises OutOfMemory."""
    try:
        return heal(student, pairs, cfg, round, seed, pad_id, emit, teacher=teacher)
    except torch.OutOfMemoryError:
        pass  # leave the except block first, so the failed step's tensors can be freed
    free_memory()
    if cfg.heal_batch_size < 2:
        raise OutOfMemory("out of memory in heal at --heal-batch-size 1; use shorter completions or a smaller model")
    half = dataclasses.replace(cfg, heal_batch_size=cfg.heal_batch_size // 2, grad_accum=cfg.grad_accum * 2)
    logger.warning(
        f"out of memory in heal at --heal-batch-size {cfg.heal_batch_size}; retrying the round with "
        f"{half.heal_batch_size} x grad-accum {half.grad_accum}"
    )
    retry_emit = None if emit is None else (lambda **f: emit(**f, attempt=2))  # steps restart at 0
    try:
        return heal(student, pairs, half, round, seed, pad_id, retry_emit, teacher=teacher)
    except torch.OutOfMemoryError:
        pass
    free_memory()
    raise OutOfMemory(
        f"out of memory in heal at --heal-batch-size {cfg.heal_batch_size} and again at {half.heal_batch_size}; "
        f"pass --heal-batch-size {max(1, half.heal_batch_size // 2)} --grad-accum {half.grad_accum * 2}"
    )

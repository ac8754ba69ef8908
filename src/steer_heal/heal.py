"""Heal: train a fresh LoRA adapter on kept completions (SFT, no steering) under a divergence barrier.

    loss = NLL(completion tokens) + lambda_r * mean_i relu(D_i - tau) + spectral_lam * sum sigma_max(Delta W)
    D_i  = aggregation (mean | rmse | p95 | max) over completion i of per-position KL(student || ref)
           (kl_rev) or KL(ref || student) (kl_fwd); `nll` = no barrier.

Safety check (per micro-batch): a non-finite NLL or spectral term skips the whole micro-batch; a
non-finite barrier, or one larger than `barrier_max_ratio` x NLL, is dropped for that micro-batch and
the SFT step goes on. Both are counted and warned about once; more than `max_bad_steps` skipped
micro-batches in a round raise NonFiniteLoss (the weights have most likely diverged). `lam_warmup_frac`
ramps lambda linearly from 0 over the first part of the round.

The reference logits come from the same model with adapters switched off (`base`) or with only the
already-baked adapters on (`prev`), never from a second copy of the model. The adapter starts at B = 0,
so D = 0 at step 0.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass

import torch
from loguru import logger
from peft import LoraConfig
from tqdm.auto import tqdm

from steer_heal.bake import Student, lora_targets
from steer_heal.config import HealConfig
from steer_heal.errors import NonFiniteLoss, OutOfMemory, free_memory
from steer_heal.losses import (
    KL,
    aggregate,
    completion_batch,
    completion_terms,
    cosine_warmup,
    hinge,
    lam_at_round,
    selected_hidden,
    spectral_norm_lowrank,
)
from steer_heal.models import unwrap
from steer_heal.tokens import batches


@dataclass
class HealResult:
    adapter: str
    steps: int
    nll_first: float
    nll_last: float
    d_mean: float
    fired_frac: float
    grad_ratio_mean: float | None
    seconds: float
    barrier_skipped: int = 0
    steps_skipped: int = 0
    batch_size: int = 0
    grad_accum: int = 0


def lora_config(student: Student, cfg: HealConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=lora_targets(student.model, cfg.lora_layers, cfg.lora_targets),
        init_lora_weights=True,  # A random, B = 0: the fresh adapter is exactly the reference
    )


def _terms(l_nll: torch.Tensor, l_bar: torch.Tensor, l_spec: torch.Tensor) -> str:
    """The loss terms for a warning or an error (formatted only then: each .item() is a GPU sync)."""
    return f"nll={l_nll.item():.4g}, barrier={l_bar.item():.4g}, spectral={l_spec.item():.4g}"


def _grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float((x.float() ** 2).sum()) for x in g if x is not None))


def heal(
    student: Student,
    pairs: list[tuple[list[int], list[int]]],
    cfg: HealConfig,
    round: int,
    seed: int,
    pad_id: int,
    emit,
    log_every: int = 5,
    poison_step: int | None = None,
    barrier_boost: float = 1.0,
) -> HealResult:
    """Train adapter r<round> on (prompt ids, completion ids) pairs; returns a summary.

    `emit(**fields)` writes a heal_step event. Fault injection (tests): `poison_step` makes the NLL NaN
    from that step on, as diverged weights would; `barrier_boost` multiplies the barrier term. Raises
    NonFiniteLoss, naming the step and loss terms, once more than `cfg.max_bad_steps` micro-batches
    (or group updates with a non-finite gradient norm) were skipped, or if the adapter ends non-finite."""
    torch.manual_seed(seed * 7919 + round)
    name = student.add_adapter(round, lora_config(student, cfg))
    params = student.trainable()
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    rng = random.Random(seed * 31 + round)
    micro_per_epoch = math.ceil(len(pairs) / cfg.heal_batch_size)
    total = math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum)  # a short last group still steps
    warm = max(1, int(cfg.warmup_frac * total))
    lam_r = lam_at_round(cfg.lam, round, cfg.lam_round_pow)
    dev = next(student.model.parameters()).device
    ref_ctx = student.base if cfg.barrier_ref == "base" else student.prev
    model = student.model
    model.train()  # dropout is 0, so train() changes nothing numerically; it documents intent
    if cfg.grad_checkpoint:  # keep only block inputs; recompute each block in the backward
        unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    t0, step, micro = time.time(), 0, 0
    nlls, ds, fired, ratios = [], [], [], []
    skipped = {"barrier": 0, "step": 0}
    n_ok = 0  # good micro-batches in the current accumulation group

    def bad_micro_batch(why: str) -> None:
        """Count a skipped micro-batch (or group update); past --max-bad-steps the weights have diverged."""
        skipped["step"] += 1
        if skipped["step"] > cfg.max_bad_steps:
            raise NonFiniteLoss(
                f"heal r{round} step {step}: {why}; {skipped['step']} micro-batches skipped, "
                f"more than --max-bad-steps {cfg.max_bad_steps}"
            )
        if skipped["step"] == 1:
            logger.warning(f"heal r{round} step {step}: {why}; skipped (counted in the round record, warned once)")

    bar = tqdm(total=total, desc=f"heal r{round}", leave=False)
    try:
        for _epoch in range(cfg.epochs):
            order = list(range(len(pairs)))
            rng.shuffle(order)
            for idx in batches(order, cfg.heal_batch_size):
                batch = completion_batch([pairs[i] for i in idx], pad_id, dev)
                h_ref = None
                if cfg.reg != "nll":
                    with torch.no_grad(), ref_ctx():
                        h_ref = selected_hidden(model, batch)
                tok_lp, kl = completion_terms(
                    model, selected_hidden(model, batch), batch["targets"], h_ref, KL.get(cfg.reg), cfg.loss_chunk
                )
                l_nll = -tok_lp.mean()
                if poison_step is not None and step >= poison_step:
                    l_nll = l_nll * float("nan")
                l_bar = torch.zeros((), device=dev)
                d = torch.zeros(len(idx), device=dev)
                if kl is not None:
                    d = aggregate(kl, batch["seg"], len(idx), cfg.kl_agg)
                    ramp = min(1.0, step / (cfg.lam_warmup_frac * total)) if cfg.lam_warmup_frac > 0 else 1.0
                    l_bar = hinge(d, cfg.tau, lam_r * ramp) * barrier_boost
                l_spec = torch.zeros((), device=dev)
                if cfg.spectral_lam > 0:
                    l_spec = cfg.spectral_lam * sum(
                        spectral_norm_lowrank(A, B, s) for A, B, s in student.lora_factors(name)
                    )
                ok = bool(torch.isfinite(l_nll) and torch.isfinite(l_spec))
                if not ok:
                    bad_micro_batch(f"non-finite loss ({_terms(l_nll, l_bar, l_spec)})")
                elif not torch.isfinite(l_bar) or l_bar.item() > cfg.barrier_max_ratio * l_nll.item():
                    skipped["barrier"] += 1
                    if skipped["barrier"] == 1:
                        logger.warning(
                            f"heal r{round} step {step}: barrier dropped for this micro-batch "
                            f"({_terms(l_nll, l_bar, l_spec)}; limit {cfg.barrier_max_ratio:g} x nll); "
                            "counted in the round record, warned once"
                        )
                    l_bar = torch.zeros((), device=dev)
                fired_now = bool(l_bar.detach() > 0) and ok
                ratio = None
                if fired_now and step % log_every == 0:
                    # Measured only on logged steps: two extra backward passes through the graph.
                    gn = _grad_norm(l_nll, params)
                    ratio = _grad_norm(l_bar, params) / max(gn, 1e-12)
                micro += 1
                if ok:  # a skipped micro-batch adds no gradient
                    (l_nll + l_bar + l_spec).backward()  # summed over the group; divided by n_ok below
                    n_ok += 1
                    nlls.append(l_nll.item())
                    ds.append(d.mean().item())
                    fired.append(fired_now)
                if ratio is not None:
                    ratios.append(ratio)
                last = micro == cfg.epochs * micro_per_epoch
                if micro % cfg.grad_accum and not last:
                    continue
                # End of an accumulation group (a short last group too): the mean over its good micro-batches.
                lr = cfg.lr * cosine_warmup(step, total, warm)
                if n_ok:
                    for p in params:
                        if p.grad is not None:
                            p.grad.div_(n_ok)
                    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    if torch.isfinite(gnorm):
                        for g in opt.param_groups:
                            g["lr"] = lr
                        opt.step()
                    else:  # finite loss, non-finite gradient (e.g. an overflow in the backward): no update
                        bad_micro_batch(f"non-finite gradient norm {gnorm.item()} ({_terms(l_nll, l_bar, l_spec)})")
                opt.zero_grad(set_to_none=True)
                n_ok = 0
                if step % log_every == 0 or step == total - 1:
                    emit(
                        step=step,
                        nll=l_nll.item(),
                        d=d.mean().item(),
                        barrier=l_bar.item(),
                        spectral=l_spec.item(),
                        fired=fired_now,
                        grad_ratio=ratio,
                        lr=lr,
                        barrier_skipped=skipped["barrier"],
                        steps_skipped=skipped["step"],
                    )
                bar.update(1)
                bar.set_postfix(nll=f"{l_nll.item():.3f}", D=f"{d.mean().item():.3f}")
                step += 1
    finally:
        bar.close()
        model.eval()
        if cfg.grad_checkpoint:
            unwrap(model).gradient_checkpointing_disable()
    if not nlls:
        raise NonFiniteLoss(f"heal r{round}: every micro-batch was skipped as non-finite")
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise NonFiniteLoss(f"heal r{round}: the adapter has non-finite weights after {step} steps")
    logger.info(
        f"heal r{round}: {step} steps, nll {nlls[0]:.3f} -> {nlls[-1]:.3f}, D mean {sum(ds) / len(ds):.3f}, "
        f"barrier fired {sum(fired) / len(fired):.0%}, skipped: barrier {skipped['barrier']}, "
        f"micro-batches {skipped['step']}"
    )
    return HealResult(
        name,
        step,
        nlls[0],
        nlls[-1],
        sum(ds) / len(ds),
        sum(fired) / len(fired),
        sum(ratios) / len(ratios) if ratios else None,
        time.time() - t0,
        skipped["barrier"],
        skipped["step"],
        cfg.heal_batch_size,
        cfg.grad_accum,
    )


def heal_with_retry(student: Student, pairs, cfg: HealConfig, *args, **kw) -> HealResult:
    """`heal`, and on out-of-memory once more from a fresh adapter with half the micro-batch and twice the
    accumulation (the same examples per optimiser step). A second out-of-memory raises OutOfMemory."""
    try:
        return heal(student, pairs, cfg, *args, **kw)
    except torch.OutOfMemoryError:
        pass  # leave the except block first, so the failed step's tensors can be freed
    student.drop_training()
    free_memory()
    if cfg.heal_batch_size < 2:
        raise OutOfMemory("out of memory in heal at --heal-batch-size 1; use shorter completions or a smaller model")
    half = dataclasses.replace(cfg, heal_batch_size=cfg.heal_batch_size // 2, grad_accum=cfg.grad_accum * 2)
    logger.warning(
        f"out of memory in heal at --heal-batch-size {cfg.heal_batch_size}; retrying the round with "
        f"{half.heal_batch_size} x grad-accum {half.grad_accum}"
    )
    if "emit" in kw:  # the second attempt's step records say so (steps restart at 0)
        emit = kw["emit"]
        kw["emit"] = lambda **f: emit(**f, attempt=2)
    try:
        return heal(student, pairs, half, *args, **kw)
    except torch.OutOfMemoryError:
        pass
    student.drop_training()
    free_memory()
    raise OutOfMemory(
        f"out of memory in heal at --heal-batch-size {cfg.heal_batch_size} and again at {half.heal_batch_size}; "
        f"pass --heal-batch-size {max(1, half.heal_batch_size // 2)} --grad-accum {half.grad_accum * 2}"
    )

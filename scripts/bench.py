"""Speed and memory benchmarks; each figure is a ratio of two measurements taken in the same run.

    uv run python scripts/bench.py [--batch 32] [--new-tokens 32] [--run-dir out/<smol run>] [run flags]
    # GPU: gemma-3-4b-it's exact text architecture, random weights, bf16, batch 64
    uv run python scripts/bench.py --batch 64 --model random:data/gemma-3-4b-it.text_config.json \
        --dtype bfloat16 --device cuda --preset gemma --heal-len 1024 --heal-batch 2

Measures, on the configured model (default: the smol preset):
  steer_overhead_ratio   steered / unsteered tokens/s, same batch, same token count (hook cost)
  decode_frac_of_bound   decode-only tokens/s (mixed-strength steered, transformers' generate) / the memory
                         limit: every step reads the weights once and each row's K/V so far (decode_bound)
  compiled_speedup       decode-only tokens/s of decode.py's compiled static-cache loop / the eager one, same
                         rows, same process (decode_frac_of_bound_compiled; graphs, recompiles, compile_s)
  top_p_step_ratio       one top-p sampling step (sort + cumsum) of batch x gemma's 262,208 logits / one
                         compiled decode step of the bench model (top_p_ms: its milliseconds)
  batch_speedup          one mixed-strength batch / the same rows generated one at a time (tokens/s)
  filter_speedup         tail-ppl scoring completions/s, batched / one at a time
  kd_mem_ratio           (--kd) peak memory of one kl_teacher heal step / one sft step, same shape
  kd_time_ratio          (--kd) seconds of one kl_teacher heal step / one sft step (teacher forward included)
  heal_mem_ratio         peak memory of one heal step (forward + backward of NLL + kl_rev): heal.py's
                         completion-only chunked loss / the full [B, L, V] log-softmax, at L = --heal-len
                         (half prompt, half completion), block gradient checkpointing on for both; each
                         in a fresh process (peak live tensor bytes from the torch profiler's allocation
                         events on CPU, max_memory_allocated on CUDA).
                         heal_mem_ratio_no_ckpt: the same with block activations stored.
  eval_speedup           eval vignettes/s with the shared-prefix tree / the plain pass (same numbers:
                         eval_max_abs_diff is the largest |difference| in any answer log-prob, nats)
  eval_vignettes_per_s   vignettes scored per second (both option orders), tree path
  ref_nll_share          time of the reference-answer NLL (capability tax) / time of the vignette eval
  calibration_share      time of the content-free rows (contextual calibration) / time of the vignette eval
  null_direction_ratio   seconds of one random direction of the null the old way (every vignette + ref_nll) /
                         the new way (the --null-vignettes subset, no ref_nll), --null-reps directions each
  null_stage_ratio       the null stage's seconds now (--null-vectors directions, new way) / before (8, old way)
  think_cost_ratio       eval wall time with --eval-think-tokens N / without, on --think-vignettes
  round_seconds          wall time of the last round of --run-dir, with its per-stage breakdown
The last line printed is one JSON object with these keys.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from tabulate import tabulate

from steer_heal import decode as decoding
from steer_heal import extract, filters, null, seeds
from steer_heal.cli import ArgumentParser, cli, nonneg_int, positive_int
from steer_heal.errors import UserError
from steer_heal.evaluate import CONTENT_FREE, answer_logprobs, reference_nll
from steer_heal.generate import Row, Sampling, generate
from steer_heal.models import input_device, unwrap
from steer_heal.records import RunInfo
from steer_heal.session import Session


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


GEMMA_VOCAB = 262_208  # gemma-3-4b-it's vocabulary: what top-p sorts per row and step in the research setting


def gen(s: Session, rows, vectors, batch: int, n: int, decode: str = "eager"):
    """Greedy, exactly n new tokens per row (min = max), so steered and unsteered runs do equal work."""
    return generate(s.model, s.tok, rows, vectors, sampling=Sampling(n, do_sample=False, min_new_tokens=n),
                    batch_size=batch, decode=decode)  # fmt: skip


def decode_bound(weight_bytes: int, kv_bytes: list[int], rows: int, bandwidth: float) -> float:
    """Decode tokens/s at the memory limit: step s must read every weight once and each row's K/V so far
    (kv_bytes[s], summed over rows), so tokens/s <= rows x steps x bandwidth / sum_s (weight_bytes + kv_bytes[s]).
    With no KV it is the weights-only bound rows x bandwidth / weight_bytes."""
    return rows * len(kv_bytes) * bandwidth / sum(weight_bytes + kv for kv in kv_bytes)


def copy_bandwidth(dev: torch.device, nbytes: int = 1 << 28, reps: int = 5) -> float:
    """Memory bandwidth in bytes/s from a large on-device copy (each copy reads and writes nbytes)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    x.fill_(1)
    y = torch.empty_like(x)
    y.copy_(x)  # warm-up: first touch of the pages
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return 2 * nbytes * reps / (time.perf_counter() - t0)


def heal_step_peak(argv: list[str], mode: str, length: int, batch: int, ckpt: bool) -> tuple[int, float]:
    """Peak extra bytes of one heal step, forward + backward of NLL + kl_rev (run in a fresh process), and
    the seconds of the fastest of three more, unprofiled steps (gradients accumulate; only time matters).

    lean = what heal.py does (hidden states at completion positions, chunked + checkpointed LM head and
    log-softmax, reference rebuilt from its hidden states); naive = full [B, L, V] log-softmax for the
    student and the reference, then select; kd = heal.py's step for --heal-target kl_teacher (the steered
    teacher's hidden states too, its log-probs rebuilt per chunk). `ckpt` turns on block-level gradient
    checkpointing."""
    from steer_heal import heal
    from steer_heal.config import HealConfig
    from steer_heal.heal import lora_config
    from steer_heal.losses import (
        completion_batch,
        completion_terms,
        kl_rev,
        naive_logprobs,
        nll,
        selected_hidden,
    )
    from steer_heal.models import unwrap

    s = Session.from_argv(argv)
    st = s.student
    st.add_adapter(0, lora_config(st, HealConfig()))
    st.model.train()
    if ckpt:
        unwrap(st.model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dev = input_device(st.model)
    g = torch.Generator().manual_seed(0)
    vocab = st.model.get_output_embeddings().weight.shape[0]
    half = length // 2
    rand = lambda: torch.randint(0, vocab, (half,), generator=g).tolist()  # noqa: E731
    pairs = [(rand(), rand()) for _ in range(batch)]  # half prompt, half completion
    b = completion_batch(pairs, s.tok.pad_token_id, dev)

    teacher = heal.SteeredTeacher({L: torch.randn(st.model.config.hidden_size) for L in s.layers}, [2.0] * batch)
    prep = heal.Prepared(teacher.coeffs, None, None, None)

    def step():
        if mode == "kd":
            distill = heal.teacher_targets(st, b, list(range(batch)), teacher, prep)
            loss = heal.loss_terms(st, "r00", b, HealConfig(heal_target="kl_teacher", tau=0.0), 1.0, distill).total()
        elif mode == "lean":
            with torch.no_grad(), st.base():
                h_ref = selected_hidden(st.model, b)
            tok, kl, _ = completion_terms(st.model, selected_hidden(st.model, b), b["targets"], h_ref, kl_rev)
            loss = -tok.mean() + kl.mean()
        else:
            lp = naive_logprobs(st.model, b)
            with torch.no_grad(), st.base():
                ref = naive_logprobs(st.model, b)
            loss = nll(lp, b["targets"]) + kl_rev(lp, ref).mean()
        loss.backward()

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = cpu_peak_live_bytes(step)
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    seconds = min(timed(lambda: (step(), sync()))[1] for _ in range(3))  # the fastest of 3: less noise
    return peak, seconds


def cpu_peak_live_bytes(fn) -> int:
    """Peak bytes of live CPU tensors allocated while fn runs: the running sum of the torch profiler's
    allocation (+) and free (-) events, the CPU analogue of torch.cuda.max_memory_allocated. (Peak RSS
    would also count memory the allocator keeps after a free, which blurs a 2x difference.)"""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    mem = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    cur = peak = 0
    for e in mem:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def last_round_seconds(run_dir: Path) -> tuple[int, dict[str, float]]:
    """(round, per-stage seconds) of the last finished round of a run."""
    info = RunInfo.read(run_dir)
    if not info.rounds:
        raise UserError(f"--run-dir {run_dir}: no finished round to time (no round record in events.jsonl)")
    return info.rounds[-1].round, info.rounds[-1].get("seconds") or {}


class Bench:
    """Measurements of one session, collected as JSON figures and table lines."""

    def __init__(self, s: Session):
        self.s, self.res, self.table = s, {}, []

    def add(self, what: str, value: str, ratio: str = "") -> None:
        self.table.append([what, value, ratio])

    def generate(self, v, batch: int, n: int, single_rows: int | None = None) -> list:
        """Steering-hook overhead and mixed-strength batching (transformers' generate)."""
        s, rows = self.s, self.rows(batch)
        gen(s, rows, None, batch, 2), gen(s, rows, v, batch, 2)  # warm-up at the measured shapes (allocator, kernels)
        # Twice each, alternating, keeping the faster: on a GPU the first batch-64 pass ran at half the speed of
        # the second, which made steering look 1.85x *faster* than no steering.
        t_plain = t_steer = float("inf")
        for _ in range(2):
            plain, t = timed(lambda: gen(s, rows, None, batch, n))
            t_plain = min(t_plain, t)
            steered, t = timed(lambda: gen(s, rows, v, batch, n))
            t_steer = min(t_steer, t)
        tok_plain, tok_steer = sum(len(c.ids) for c in plain) / t_plain, sum(len(c.ids) for c in steered) / t_steer
        self.res["steer_overhead_ratio"] = tok_steer / tok_plain
        self.add(f"generate, unsteered, batch {batch}", f"{tok_plain:.1f} tok/s")
        self.add(f"generate, mixed-strength steered, batch {batch}", f"{tok_steer:.1f} tok/s",
                 f"steer_overhead_ratio {self.res['steer_overhead_ratio']:.3f}")  # fmt: skip
        gen(s, rows[:1], v, 1, 2)  # warm-up at batch 1
        single, t_single = timed(lambda: gen(s, rows[:single_rows], v, 1, n))  # tok/s: a few rows are enough
        tok_single = sum(len(c.ids) for c in single) / t_single
        self.res["batch_speedup"] = tok_steer / tok_single
        self.add("generate, steered, one at a time", f"{tok_single:.1f} tok/s",
                 f"batch_speedup {self.res['batch_speedup']:.2f}")  # fmt: skip
        return steered

    def rows(self, batch: int) -> list[Row]:
        """`batch` generation prompts, the preset's strengths in turn (a mixed-strength batch)."""
        s, alphas = self.s, self.s.cfg.generate.alphas
        return [Row(i, s.prompts[i % len(s.prompts)], s.prompt_ids[i % len(s.prompts)], alphas[i % len(alphas)],
                    alphas[i % len(alphas)]) for i in range(batch)]  # fmt: skip

    def decode(self, v, batch: int, n: int, backend: str | None) -> None:
        """Decode-only tokens/s of the eager loop (transformers' generate) and the compiled one (decode.py),
        the same mixed-strength steered rows, alternating in this process, each against decode_bound."""
        s, rows = self.s, self.rows(batch)
        dec = decoding.decoder(s.model, backend)
        _, t_compile = timed(lambda: gen(s, rows, v, batch, n, "compiled"))  # the first call compiles
        gen(s, rows, v, batch, 2, "eager")  # warm-up at the measured shape
        t1, tn = {"eager": float("inf"), "compiled": float("inf")}, {"eager": float("inf"), "compiled": float("inf")}
        for _ in range(2):  # alternating, the faster of two each (see generate)
            for mode in ("eager", "compiled"):
                t1[mode] = min(t1[mode], timed(partial(gen, s, rows, v, batch, 1, mode))[1])  # prefill + token 1
                tn[mode] = min(tn[mode], timed(partial(gen, s, rows, v, batch, n, mode))[1])
        tok_s = {m: batch * (n - 1) / max(tn[m] - t1[m], 1e-9) for m in t1}
        base = unwrap(s.model)
        cfg, dtype = base.config.get_text_config(), next(base.parameters()).dtype
        # the K/V each step must read: every row's real prompt tokens and those generated so far
        kv = [sum(decoding.kv_read_bytes(cfg, dtype, len(r.prompt_ids) + k) for r in rows) for k in range(1, n)]
        bw = copy_bandwidth(input_device(s.model))
        wbytes = sum(p.numel() * p.element_size() for p in s.model.parameters())
        bound, weights_only = decode_bound(wbytes, kv, batch, bw), batch * bw / wbytes
        self.res |= {"decode_tok_s": tok_s["eager"], "decode_tok_s_compiled": tok_s["compiled"],
                     "decode_bound_tok_s": bound, "decode_bound_weights_only_tok_s": weights_only,
                     "decode_frac_of_bound": tok_s["eager"] / bound,
                     "decode_frac_of_bound_compiled": tok_s["compiled"] / bound,
                     "compiled_speedup": tok_s["compiled"] / tok_s["eager"], "compile_backend": [dec.backend, dec.mode],
                     "compiled_graphs": dec.graphs, "compiled_recompiles": dec.recompiles,
                     "compile_s": dec.compile_s, "compiled_first_call_s": t_compile}  # fmt: skip
        mean_kv = sum(kv) / len(kv)
        self.add(f"decode only, mixed-strength steered, batch {batch}, eager", f"{tok_s['eager']:.1f} tok/s",
                 f"{self.res['decode_frac_of_bound']:.3f} of the bound {bound:.0f} tok/s ({wbytes / 2**30:.2f} GiB "
                 f"weights + {mean_kv / 2**20:.1f} MiB K/V per step, copy bandwidth {bw / 1e9:.1f} GB/s; "
                 f"weights only: {weights_only:.0f} tok/s)")  # fmt: skip
        self.add(f"decode only, same rows, compiled ({dec.backend}{', ' + dec.mode if dec.mode else ''})",
                 f"{tok_s['compiled']:.1f} tok/s",
                 f"compiled_speedup {self.res['compiled_speedup']:.2f}, {self.res['decode_frac_of_bound_compiled']:.3f}"
                 f" of the bound; {dec.graphs} graph(s), {dec.recompiles} recompile(s), compile {dec.compile_s:.1f} s"
                 f" (first call {t_compile:.1f} s)")  # fmt: skip
        self.top_p(batch, batch * (n - 1) / max(tn["compiled"] - t1["compiled"], 1e-9))

    def top_p(self, batch: int, compiled_tok_s: float, reps: int = 5) -> None:
        """Milliseconds of one top-p sampling step (decode.next_token at top-p 0.95: sort, softmax, cumsum,
        scatter, multinomial) over batch x GEMMA_VOCAB fp32 logits, against one compiled decode step."""
        dev = input_device(self.s.model)
        logits = torch.randn(batch, GEMMA_VOCAB, device=dev)
        stops, sampling = torch.tensor([0], device=dev), Sampling(1, top_p=0.95)
        sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
        decoding.next_token(logits, 1, sampling, stops), sync()  # warm-up
        ms = min(timed(lambda: (decoding.next_token(logits, 1, sampling, stops), sync()))[1] for _ in range(reps)) * 1e3
        step_ms = batch / compiled_tok_s * 1e3
        self.res |= {"top_p_ms": ms, "top_p_step_ratio": ms / step_ms}
        self.add(f"top-p 0.95 sampling step, {batch} x {GEMMA_VOCAB} logits", f"{ms:.1f} ms",
                 f"top_p_step_ratio {ms / step_ms:.2f} (one compiled decode step: {step_ms:.1f} ms)")  # fmt: skip

    def filter(self, comps, batch: int) -> None:
        s, pairs = self.s, [(c.prompt_ids, c.ids) for c in comps]
        with s.student.base():
            _, t_b = timed(lambda: filters.tail_ppl(s.model, pairs, 0.5, s.tok.pad_token_id, batch))
            _, t_1 = timed(lambda: filters.tail_ppl(s.model, pairs, 0.5, s.tok.pad_token_id, 1))
        self.res["filter_speedup"] = t_1 / t_b
        self.add("filter tail-ppl, batched", f"{len(pairs) / t_b:.1f} completions/s")
        self.add("filter tail-ppl, one at a time", f"{len(pairs) / t_1:.1f} completions/s",
                 f"filter_speedup {self.res['filter_speedup']:.2f}")  # fmt: skip

    def eval(self) -> None:
        """The vignette eval, shared-prefix tree against the plain pass (same numbers), and the ref_nll cost."""
        s, e = self.s, self.s.cfg.eval
        run = lambda shared, prior=False: answer_logprobs(s.model, s.tok, s.vigs, e.eval_batch_size,  # noqa: E731
                                                          shared_prefix=shared, prior=prior)  # fmt: skip
        run(True)  # warm-up
        plain, t_plain = timed(lambda: run(False))
        tree, t_tree = timed(lambda: run(True))
        _, t_cal = timed(lambda: run(True, prior=True))
        self.res["calibration_share"] = (t_cal - t_tree) / t_tree
        n = len(s.vigs)
        self.res["eval_max_abs_diff"] = float((tree["logp"] - plain["logp"]).abs().max())
        self.res["eval_vignettes_per_s_plain"] = n / t_plain
        self.res["eval_vignettes_per_s"] = n / t_tree
        self.res["eval_speedup"] = t_plain / t_tree
        pairs = s.reference_pairs()
        _, t_ref = timed(lambda: reference_nll(s.model, pairs, s.tok.pad_token_id, e.eval_batch_size))
        self.res["ref_nll_share"] = t_ref / t_tree
        self.add(f"eval, {n} vignettes x 2 orders, plain", f"{n / t_plain:.2f} vignettes/s")
        speed = f"eval_speedup {self.res['eval_speedup']:.2f}, max |diff| {self.res['eval_max_abs_diff']:.1e} nats"
        self.add(f"eval, {n} vignettes x 2 orders, shared prefix", f"{n / t_tree:.2f} vignettes/s", speed)
        self.add(
            f"reference NLL, {len(pairs)} answers", f"{t_ref:.1f} s", f"ref_nll_share {self.res['ref_nll_share']:.2f}"
        )
        self.add(f"eval with the {len(CONTENT_FREE)} content-free rows", f"{t_cal:.1f} s",
                 f"calibration_share {self.res['calibration_share']:.3f}")  # fmt: skip

    def null(self, v, reps: int) -> None:
        """One random direction of the null, the old way (every vignette and ref_nll) against the new way (the
        seeded subset, no ref_nll), `reps` directions each, alternating; then the whole stage both ways."""
        s, e = self.s, self.s.cfg.eval
        c, sub = statistics.median(s.cfg.generate.alphas), null.null_vignettes(s)
        # the old way had no content-free rows either (prior=False), so the ratio is not flattered by them
        old = lambda seed: s.evaluate(extract.random_like(v, seed), c, desc="old", prior=False)  # noqa: E731
        new = lambda seed: s.evaluate(extract.random_like(v, seed), c, desc="new", vigs=sub, references=False)  # noqa: E731
        t_old = t_new = 0.0
        with s.as_model("base"):
            old(10_000), new(10_000)  # warm-up at the measured shapes
            for i in range(reps):
                t_old += timed(partial(old, i))[1]
                t_new += timed(partial(new, i))[1]
        t_old, t_new = t_old / reps, t_new / reps
        self.res["null_direction_ratio"] = t_old / t_new
        self.res["null_stage_ratio"] = e.null_vectors * t_new / (8 * t_old)
        self.add(f"null direction, {len(s.vigs)} vignettes + ref_nll (before)", f"{t_old:.1f} s")
        self.add(f"null direction, {len(sub)}-vignette subset, no ref_nll", f"{t_new:.1f} s",
                 f"null_direction_ratio {self.res['null_direction_ratio']:.2f}")  # fmt: skip
        self.add(f"null stage, {e.null_vectors} directions (now) / 8 (before)",
                 f"{e.null_vectors * t_new:.0f} s / {8 * t_old:.0f} s",
                 f"null_stage_ratio {self.res['null_stage_ratio']:.2f}")  # fmt: skip

    def think(self, tokens: int, n_vig: int) -> None:
        """The cost of --eval-think-tokens: greedy thinking before the forced answer slot."""
        s, e = self.s, self.s.cfg.eval
        vigs = s.vigs[:n_vig]
        _, t0 = timed(lambda: answer_logprobs(s.model, s.tok, vigs, e.eval_batch_size))
        _, t1 = timed(lambda: answer_logprobs(s.model, s.tok, vigs, e.eval_batch_size, think_tokens=tokens))
        self.res["think_cost_ratio"] = t1 / t0
        cost = f"think_cost_ratio {self.res['think_cost_ratio']:.1f} (vs {len(vigs) / t0:.2f} vignettes/s without)"
        self.add(
            f"eval with --eval-think-tokens {tokens}, {len(vigs)} vignettes", f"{len(vigs) / t1:.2f} vignettes/s", cost
        )

    def heal_memory(self, rest: list[str], length: int, batch: int, kd: bool = False) -> None:
        """Heal-step peak memory, each variant in a fresh process: with the blocks' activations stored (the
        smol default) and with gradient checkpointing (gemma preset), where the LM head's share shows. With
        `kd`, also the kl_teacher step against the sft one (kd_mem_ratio, goal <= 1.2)."""

        def peak(mode: str, ckpt: bool) -> tuple[int, float]:
            flags = ["--_heal-peak", mode, "--heal-len", str(length), "--heal-batch", str(batch)]
            cmd = [sys.executable, __file__, *flags, *(["--_ckpt"] if ckpt else []), *rest]
            nbytes, secs = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-2:]
            return int(nbytes), float(secs)

        for ckpt in (False, True):
            got = {mode: peak(mode, ckpt) for mode in ("lean", "naive", *(("kd",) if kd else ()))}
            peaks, secs = {m: v[0] for m, v in got.items()}, {m: v[1] for m, v in got.items()}
            sfx = "" if ckpt else "_no_ckpt"
            self.res[f"heal_mem_ratio{sfx}"] = peaks["lean"] / peaks["naive"]
            self.res[f"heal_peak_mib{sfx}"] = {m: round(v / 2**20) for m, v in peaks.items()}
            ratio = {"naive": f"heal_mem_ratio{sfx} {self.res[f'heal_mem_ratio{sfx}']:.3f}"}
            if kd:
                self.res[f"kd_mem_ratio{sfx}"] = peaks["kd"] / peaks["lean"]
                self.res[f"kd_time_ratio{sfx}"] = secs["kd"] / secs["lean"]
                ratio["kd"] = (f"kd_mem_ratio {self.res[f'kd_mem_ratio{sfx}']:.3f}, kd_time_ratio "
                               f"{self.res[f'kd_time_ratio{sfx}']:.2f} (kl_teacher / sft step)")  # fmt: skip
            for mode in peaks:
                what = f"heal step peak, {mode}, B={batch} L={length}, grad ckpt {'on' if ckpt else 'off'}"
                self.add(what, f"{peaks[mode] / 2**20:.0f} MiB, {secs[mode]:.2f} s", ratio.get(mode, ""))


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=positive_int, default=32)
    ap.add_argument("--new-tokens", type=positive_int, help="tokens per row (default: the preset's --max-new-tokens)")
    ap.add_argument("--heal-len", type=positive_int, default=1024)
    ap.add_argument("--heal-batch", type=positive_int, default=2)
    ap.add_argument("--run-dir", help="a finished run whose last round gives round_seconds")
    ap.add_argument("--single-rows", type=positive_int, help="rows generated one at a time (default: --batch)")
    ap.add_argument("--think-tokens", type=nonneg_int, default=32, help="think budget to cost (0 = skip)")
    ap.add_argument("--think-vignettes", type=positive_int, default=28, help="vignettes for the think cost")
    ap.add_argument("--only", nargs="+", choices=["generate", "decode", "filter", "eval", "think", "null", "heal"],
                    help="a subset")  # fmt: skip
    ap.add_argument("--compile-backend", help="torch.compile backend of the compiled decode (default: inductor)")
    ap.add_argument("--null-reps", type=positive_int, default=3, help="random directions timed each way (null)")
    ap.add_argument("--kd", action="store_true", help="also the kl_teacher heal step's memory (vs sft)")
    ap.add_argument("--_heal-peak", choices=["lean", "naive", "kd"], help=argparse.SUPPRESS)
    ap.add_argument("--_ckpt", action="store_true", help=argparse.SUPPRESS)
    a, rest = ap.parse_known_args(argv)
    seeds.seed_globals(0)  # the bench's LoRA init and random vectors draw from the global generators
    if a._heal_peak:
        print(*heal_step_peak(rest, a._heal_peak, a.heal_len, a.heal_batch, a._ckpt))
        return 0
    last_round = last_round_seconds(Path(a.run_dir)) if a.run_dir else None  # a bad --run-dir fails now, not later
    want = set(a.only or ["generate", "decode", "filter", "eval", "think", "null", "heal"])
    s = Session.from_argv(rest)
    b, n = Bench(s), a.new_tokens or s.cfg.generate.max_new_tokens
    v = s.teacher() if want & {"generate", "decode", "filter", "null"} else None
    if want & {"generate", "filter"}:
        comps = b.generate(v, a.batch, n, a.single_rows)
        if "filter" in want:
            b.filter(comps, a.batch)
    if "decode" in want:
        b.decode(v, a.batch, n, a.compile_backend)
    if "eval" in want:
        b.eval()
    if "think" in want and a.think_tokens:
        b.think(a.think_tokens, a.think_vignettes)
    if "null" in want:
        b.null(v, a.null_reps)
    if "heal" in want:
        b.heal_memory(rest, a.heal_len, a.heal_batch, a.kd)
    b.res["round_seconds"] = None
    if last_round:
        r, secs = last_round
        b.res["round_seconds"], b.res["round_breakdown"] = sum(secs.values()), secs
        b.add(f"round {r} of {Path(a.run_dir).name}", f"{b.res['round_seconds']:.0f} s",
              ", ".join(f"{k} {x:.0f}" for k, x in secs.items()))  # fmt: skip
    dev = input_device(s.model)
    print(
        f"\nmodel {s.cfg.model} on {dev} ({torch.get_num_threads()} threads), batch {a.batch}, {n} new tokens per row"
    )
    print(tabulate(b.table, headers=["measurement", "value", "ratio"], tablefmt="github"))
    print(json.dumps(b.res))
    return 0


if __name__ == "__main__":
    cli(main)

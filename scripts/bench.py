"""Speed and memory benchmarks; each figure is a ratio of two measurements taken in the same run.

    uv run python scripts/bench.py [--batch 32] [--new-tokens 32] [--run-dir out/<smol run>] [run flags]
    # GPU: gemma-3-4b-it's exact text architecture, random weights, bf16, batch 64
    uv run python scripts/bench.py --batch 64 --model random:data/gemma-3-4b-it.text_config.json \
        --dtype bfloat16 --device cuda --preset gemma --heal-len 1024 --heal-batch 2

Measures, on the configured model (default: the smol preset):
  steer_overhead_ratio   steered / unsteered tokens/s, same batch, same token count (hook cost)
  decode_frac_of_bound   decode-only tokens/s / (batch x copy bandwidth / weight bytes), the memory limit
  batch_speedup          one mixed-strength batch / the same rows generated one at a time (tokens/s)
  filter_speedup         tail-ppl scoring completions/s, batched / one at a time
  heal_mem_ratio         peak memory of one heal step (forward + backward of NLL + kl_rev): heal.py's
                         completion-only chunked loss / the full [B, L, V] log-softmax, at L = --heal-len
                         (half prompt, half completion), block gradient checkpointing on for both; each
                         in a fresh process (peak live tensor bytes from the torch profiler's allocation
                         events on CPU, max_memory_allocated on CUDA).
                         heal_mem_ratio_no_ckpt: the same with block activations stored.
  eval_vignettes_per_s   vignettes scored per second (both option orders)
  think_cost_ratio       eval wall time with --eval-think-tokens N / without, on --think-vignettes
  round_seconds          wall time of the last round of --run-dir, with its per-stage breakdown
The last line printed is one JSON object with these keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from steer_heal import filters
from steer_heal.cli import cli
from steer_heal.errors import UserError
from steer_heal.generate import Row, Sampling, generate
from steer_heal.records import RunInfo
from steer_heal.session import Session


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def gen(s: Session, rows, vectors, batch: int, n: int):
    """Greedy, exactly n new tokens per row (min = max), so steered and unsteered runs do equal work."""
    return generate(s.model, s.tok, rows, vectors, sampling=Sampling(n, do_sample=False, min_new_tokens=n),
                    batch_size=batch)  # fmt: skip


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


def heal_step_peak(argv: list[str], lean: bool, length: int, batch: int, ckpt: bool) -> int:
    """Peak extra bytes of one heal step, forward + backward of NLL + kl_rev (run in a fresh process).

    lean = what heal.py does (hidden states at completion positions, chunked + checkpointed LM head and
    log-softmax, reference rebuilt from its hidden states); naive = full [B, L, V] log-softmax for the
    student and the reference, then select. `ckpt` turns on block-level gradient checkpointing for both."""
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
    dev = next(st.model.parameters()).device
    g = torch.Generator().manual_seed(0)
    vocab = st.model.get_output_embeddings().weight.shape[0]
    half = length // 2
    rand = lambda: torch.randint(0, vocab, (half,), generator=g).tolist()  # noqa: E731
    pairs = [(rand(), rand()) for _ in range(batch)]  # half prompt, half completion
    b = completion_batch(pairs, s.tok.pad_token_id, dev)

    def step():
        if lean:
            with torch.no_grad(), st.base():
                h_ref = selected_hidden(st.model, b)
            tok, kl = completion_terms(st.model, selected_hidden(st.model, b), b["targets"], h_ref, kl_rev)
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
        return torch.cuda.max_memory_allocated() - before
    return cpu_peak_live_bytes(step)


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
    return info.rounds[-1].round, info.rounds[-1].seconds


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, help="tokens per row (default: the preset's --max-new-tokens)")
    ap.add_argument("--heal-len", type=int, default=1024)
    ap.add_argument("--heal-batch", type=int, default=2)
    ap.add_argument("--run-dir", help="a finished run whose last round gives round_seconds")
    ap.add_argument("--think-tokens", type=int, default=32, help="think budget whose eval cost to measure (0 = skip)")
    ap.add_argument("--think-vignettes", type=int, default=28, help="vignettes for the think-budget measurement")
    ap.add_argument("--_heal-peak", choices=["lean", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--_ckpt", action="store_true", help=argparse.SUPPRESS)
    a, rest = ap.parse_known_args(argv)
    if a._heal_peak:
        print(heal_step_peak(rest, a._heal_peak == "lean", a.heal_len, a.heal_batch, a._ckpt))
        return 0

    last_round = last_round_seconds(Path(a.run_dir)) if a.run_dir else None  # a bad --run-dir fails now, not later
    s = Session.from_argv(rest)
    v = s.teacher()
    alphas = s.cfg.generate.alphas
    rows = [Row(i, s.prompts[i % len(s.prompts)], s.prompt_ids[i % len(s.prompts)], alphas[i % len(alphas)],
                alphas[i % len(alphas)]) for i in range(a.batch)]  # fmt: skip
    n, B = a.new_tokens or s.cfg.generate.max_new_tokens, a.batch
    gen(s, rows[:4], v, 4, 4)  # warm-up
    res: dict[str, float | None] = {}
    table = []

    plain, t_plain = timed(lambda: gen(s, rows, None, B, n))
    steered, t_steer = timed(lambda: gen(s, rows, v, B, n))
    tok_plain = sum(len(c.ids) for c in plain) / t_plain
    tok_steer = sum(len(c.ids) for c in steered) / t_steer
    res["steer_overhead_ratio"] = tok_steer / tok_plain
    table.append([f"generate, unsteered, batch {B}", f"{tok_plain:.1f} tok/s", ""])
    table.append(
        [
            f"generate, mixed-strength steered, batch {B}",
            f"{tok_steer:.1f} tok/s",
            f"steer_overhead_ratio {res['steer_overhead_ratio']:.3f}",
        ]
    )

    single, t_single = timed(lambda: gen(s, rows, v, 1, n))
    tok_single = sum(len(c.ids) for c in single) / t_single
    res["batch_speedup"] = tok_steer / tok_single
    table.append(
        ["generate, steered, one at a time", f"{tok_single:.1f} tok/s", f"batch_speedup {res['batch_speedup']:.2f}"]
    )

    # Decode rate against the memory-bandwidth limit: each decode step must read every weight once, so
    # tokens/s <= batch x bandwidth / weight bytes (KV-cache reads ignored, which only lowers the limit).
    _, t_one = timed(lambda: gen(s, rows, None, B, 1))  # prefill + the first token
    res["decode_tok_s"] = B * (n - 1) / max(t_plain - t_one, 1e-9)
    bw = copy_bandwidth(next(s.model.parameters()).device)
    wbytes = sum(p.numel() * p.element_size() for p in s.model.parameters())
    res["decode_bound_tok_s"] = B * bw / wbytes
    res["decode_frac_of_bound"] = res["decode_tok_s"] / res["decode_bound_tok_s"]
    table.append(
        [
            f"decode only, unsteered, batch {B}",
            f"{res['decode_tok_s']:.1f} tok/s",
            f"{res['decode_frac_of_bound']:.2f} of the bound {res['decode_bound_tok_s']:.0f} tok/s "
            f"({wbytes / 2**30:.2f} GiB weights, copy bandwidth {bw / 1e9:.1f} GB/s)",
        ]
    )

    pairs = [(c.prompt_ids, c.ids) for c in steered]
    with s.student.base():
        _, t_b = timed(lambda: filters.tail_ppl(s.model, pairs, 0.5, s.tok.pad_token_id, B))
        _, t_1 = timed(lambda: filters.tail_ppl(s.model, pairs, 0.5, s.tok.pad_token_id, 1))
    res["filter_speedup"] = t_1 / t_b
    table.append(["filter tail-ppl, batched", f"{len(pairs) / t_b:.1f} completions/s", ""])
    table.append(
        [
            "filter tail-ppl, one at a time",
            f"{len(pairs) / t_1:.1f} completions/s",
            f"filter_speedup {res['filter_speedup']:.2f}",
        ]
    )

    _, t_eval = timed(lambda: s.evaluate(desc="bench eval"))
    res["eval_vignettes_per_s"] = len(s.vigs) / t_eval
    table.append([f"eval, {len(s.vigs)} vignettes x 2 orders", f"{res['eval_vignettes_per_s']:.2f} vignettes/s", ""])
    if a.think_tokens:  # the cost of --eval-think-tokens: greedy thinking before the forced answer slot
        full_cfg, full_vigs = s.cfg, s.vigs
        s.vigs = full_vigs[: a.think_vignettes]
        _, t0 = timed(lambda: s.evaluate(desc="bench eval, no think"))
        s.cfg = dataclasses.replace(full_cfg, eval=dataclasses.replace(full_cfg.eval, eval_think_tokens=a.think_tokens))
        _, t1 = timed(lambda: s.evaluate(desc=f"bench eval, think {a.think_tokens}"))
        s.cfg, s.vigs = full_cfg, full_vigs
        n_v = min(a.think_vignettes, len(full_vigs))
        res["think_cost_ratio"] = t1 / t0
        table.append(
            [
                f"eval with --eval-think-tokens {a.think_tokens}, {n_v} vignettes",
                f"{n_v / t1:.2f} vignettes/s",
                f"think_cost_ratio {res['think_cost_ratio']:.1f} (vs {n_v / t0:.2f} vignettes/s without)",
            ]
        )

    # Heal-step peak memory, each variant in a fresh process: with the blocks' activations stored (the
    # smol default) and with gradient checkpointing (gemma preset), where the LM head's share shows.
    for ckpt in (False, True):
        peaks = {}
        for mode in ("lean", "naive"):
            flags = ["--_heal-peak", mode, "--heal-len", str(a.heal_len), "--heal-batch", str(a.heal_batch)]
            cmd = [sys.executable, __file__, *flags, *(["--_ckpt"] if ckpt else []), *rest]
            p = subprocess.run(cmd, capture_output=True, text=True, check=True)
            peaks[mode] = int(p.stdout.strip().splitlines()[-1])
        key = "heal_mem_ratio" if ckpt else "heal_mem_ratio_no_ckpt"
        res[key] = peaks["lean"] / peaks["naive"]
        res[f"heal_peak_mib{'' if ckpt else '_no_ckpt'}"] = {m: round(v / 2**20) for m, v in peaks.items()}
        for mode in ("lean", "naive"):
            table.append(
                [
                    f"heal step peak, {mode}, B={a.heal_batch} L={a.heal_len}, grad ckpt {'on' if ckpt else 'off'}",
                    f"{peaks[mode] / 2**20:.0f} MiB",
                    f"{key} {res[key]:.3f}" if mode == "naive" else "",
                ]
            )

    res["round_seconds"] = None
    if last_round:
        r, secs = last_round
        res["round_seconds"] = sum(secs.values())
        res["round_breakdown"] = secs
        breakdown = ", ".join(f"{k} {x:.0f}" for k, x in secs.items())
        table.append([f"round {r} of {Path(a.run_dir).name}", f"{res['round_seconds']:.0f} s", breakdown])
    dev = next(s.model.parameters()).device
    print(f"\nmodel {s.cfg.model} on {dev} ({torch.get_num_threads()} threads), batch {B}, {n} new tokens per row")
    print(tabulate(table, headers=["measurement", "value", "ratio"], tablefmt="github"))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    cli(main)

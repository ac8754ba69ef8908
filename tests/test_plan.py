"""--plan: per-stage peak memory from the config alone (no weights), and whether it fits."""

from __future__ import annotations

import pytest

from steer_heal import plan
from steer_heal.config import parse_args
from steer_heal.run import run


def test_gemma_plan_counts_the_real_parameters_without_loading_weights():
    cfg = parse_args(["--preset", "gemma"])
    est = plan.estimate(cfg)
    s = est["sizes"]
    assert (s["layers"], s["hidden"], s["vocab"]) == (34, 2560, 262208) and s["bytes_per_param"] == 2  # bf16 on a GPU
    assert est["weights"] == s["params"] * 2 and 3.8e9 < s["params"] < 4.0e9
    # KV cache: batch x layers x (k, v) x kv_heads x head_dim x (prompt + new tokens) x bytes
    assert est["parts"]["kv_cache"] == 64 * 34 * 2 * 4 * 256 * (s["prompt_tokens"] + 256) * 2
    assert all(v > est["weights"] for v in est["stages"].values())
    # the filter scores a 64-completion batch with the LM head in chunks: no fp32 [64 x 256, 262k] log-softmax
    # (17 GB alone; the unchunked scorer peaked at 38.9 GiB on an H100, docs/benchmarks.md)
    assert est["stages"]["filter"] - est["weights"] < 4 * 2**30


def test_plan_grows_with_what_it_should():
    small, big = (
        plan.estimate(parse_args(["--preset", "gemma"])),
        plan.estimate(parse_args(["--preset", "gemma", "--heal-batch-size", "8", "--no-grad-checkpoint"])),
    )
    assert big["parts"]["heal_blocks"] > 10 * small["parts"]["heal_blocks"]  # stored blocks vs checkpointed
    assert big["parts"]["kv_cache"] == small["parts"]["kv_cache"]


@pytest.mark.parametrize("memory, code, word", [("80", 0, "every stage fits"), ("4", 1, "does NOT fit")])
def test_plan_exits_on_whether_it_fits(capsys, memory, code, word):
    argv = ["--preset", "gemma", "--plan", "--plan-memory-gb", memory]
    assert run(parse_args(argv), argv) == code
    out = capsys.readouterr().out
    assert word in out and "| heal" in out and f"against {float(memory):.1f} GiB" in out

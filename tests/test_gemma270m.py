"""The embedded pretrained Gemma 3 270M on its real weights: one round with tiny sizes through every stage,
under the preset's prompt format, checked through events.jsonl."""

from __future__ import annotations

import json
import math

from steer_heal import events
from steer_heal.config import parse_args
from steer_heal.run import run

STAGES = ["extract", "generate", "filter", "eval", "heal", "bake", "eval", "collapse", "round"]
TINY_SIZES = [
    "--n-rounds", "1", "--n-contexts", "4", "--n-prompts", "2", "--alphas", "1", "--max-new-tokens", "8",
    "--gen-batch-size", "8", "--n-keep", "2", "--min-train", "2", "--max-collect-batches", "2",
    "--ppl-mult", "100", "--rep-max", "1", "--compress-min", "0", "--distinct-min", "0", "--top-word-max", "1",
    "--english-min", "0", "--epochs", "1", "--heal-batch-size", "2", "--n-vignettes", "7",
    "--null-vectors", "2", "--null-vignettes", "7", "--n-references", "2", "--pr-contexts", "2",
    "--entropy-prompts", "0", "--coh-floor", "0", "--n-boot", "100",
]  # fmt: skip


def test_one_round_on_the_real_gemma_270m_weights(tmp_path):
    argv = ["--preset", "gemma270m", *TINY_SIZES, "--out-dir", str(tmp_path), "--run-name", "g"]
    cfg = parse_args(argv)
    assert cfg.model == "gemma3-270m" and cfg.prompt_format == "qa"
    assert run(cfg, argv) == 0
    recs = events.read(tmp_path / "g")
    assert recs[0]["stage"] == "config" and recs[0]["config"]["prompt_format"] == "qa"
    assert [x["stage"] for x in recs if x["round"] == 0 and x["stage"] in set(STAGES)] == STAGES
    (rnd,) = [x for x in recs if x["stage"] == "round"]
    assert rnd["n_kept"] >= 2 and math.isfinite(rnd["heal_nll"]) and math.isfinite(rnd["dtrait_healed"])
    assert rnd["separation_base"] is not None and recs[-1]["stage"] == "summary"
    # every completion stayed inside its answer: none carries the next turn's "Question:" marker
    (comps,) = (tmp_path / "g").glob("rounds/r*/completions.jsonl")
    texts = [json.loads(x)["text"] for x in comps.read_text(encoding="utf-8").splitlines()]
    assert texts and not any("\nQuestion:" in t for t in texts)

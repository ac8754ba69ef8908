"""Presets resolve as documented, and the stages' model plumbing works on a Gemma3-architecture model."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from steer_heal.config import parse_args, to_dict
from steer_heal.errors import UserError
from steer_heal.hooks import steer
from steer_heal.losses import completion_batch, lm_logits, naive_logprobs, selected_logprobs
from steer_heal.models import band, decoder_layers
from steer_heal.student import Student, lora_targets


def test_gemma_preset_resolution():
    cfg = parse_args(["--preset", "gemma", "--reg", "kl_fwd", "--n-rounds", "3"])
    assert cfg.model == "google/gemma-3-4b-it" and cfg.heal.reg == "kl_fwd" and cfg.n_rounds == 3
    assert cfg.dtype == "auto"  # -> bfloat16 on CUDA
    # 34 decoder layers: a narrow middle steering band and the 0.2-0.8 LoRA band
    assert band(34, cfg.extract.steer_layers) == [15, 16, 17, 18]
    assert band(34, cfg.heal.lora_layers) == list(range(7, 27))
    with pytest.raises(UserError, match=r"\(0.6, 0.4\)"):
        band(34, (0.6, 0.4))


def test_fast_flag_equals_fast_preset():
    assert to_dict(parse_args(["--fast-dev-run"])) == to_dict(parse_args(["--preset", "fast"]))
    assert parse_args(["--preset", "smol", "--fast-dev-run"]).preset == "fast"  # the alias wins, as the flag did
    assert parse_args([]).preset == "smol" and parse_args([]).model == "smollm2"


@pytest.fixture(scope="module")
def gemma():
    cfg = Gemma3TextConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        final_logit_softcapping=30.0,
        sliding_window=8,
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval().requires_grad_(False)


@torch.no_grad()
def test_gemma_architecture_plumbing(gemma):
    assert len(decoder_layers(gemma)) == 6
    ids = torch.randint(0, 300, (2, 9))
    ref = gemma(ids).logits
    with steer(gemma, {2: torch.ones(64)}, 0.0):
        assert torch.equal(gemma(ids).logits, ref)
    # soft-capped logits from selected hidden states equal the model's own logits
    b = completion_batch([([1, 2, 3], [4, 5, 6]), ([7, 8], [9])], 0, "cpu")
    assert torch.allclose(selected_logprobs(gemma, b), naive_logprobs(gemma, b), atol=1e-5)
    assert lm_logits(gemma, torch.randn(3, 64)).abs().max() <= 30.0
    names = lora_targets(gemma, (0.2, 0.8), ("q_proj", "down_proj"))
    assert names and all(".layers." in n for n in names)
    st = Student(gemma)
    from steer_heal.config import HealConfig
    from steer_heal.heal import lora_config

    st.add_adapter(0, lora_config(st, HealConfig(lora_r=2)))
    assert torch.equal(st.model(ids).logits, ref)


def test_random_model_from_the_shipped_gemma_config(tmp_path):
    """`random:<config.json>` builds that exact architecture; here gemma-3-4b-it's config shrunk to 2 thin
    layers (vocabulary, attention pattern and rope settings kept) so it runs on a CPU in seconds."""
    import json
    from pathlib import Path

    from steer_heal import models
    from steer_heal.errors import UserError
    from steer_heal.generate import Row, Sampling, generate
    from steer_heal.tokens import chat_ids

    shipped = json.loads((Path(__file__).parents[1] / "data" / "gemma-3-4b-it.text_config.json").read_text())
    assert (shipped["hidden_size"], shipped["num_hidden_layers"], shipped["vocab_size"]) == (2560, 34, 262208)
    small = dict(shipped, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=32,
                 num_attention_heads=2, num_key_value_heads=1, sliding_window=16)  # fmt: skip
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(small))
    torch.manual_seed(0)
    model, tok = models.load(f"random:{path}")
    assert type(model).__name__ == "Gemma3ForCausalLM" and len(decoder_layers(model)) == 2
    assert model.get_output_embeddings().weight.shape[0] == 262208
    out = generate(model, tok, [Row(0, "Hi", chat_ids(tok, "Hi"))], sampling=Sampling(3, do_sample=False), batch_size=1)
    assert len(out[0].ids) >= 1  # ids beyond the tokenizer's vocabulary decode to nothing, not an error
    with pytest.raises(UserError, match="random:"):
        models.load(f"random:{tmp_path / 'missing.json'}")

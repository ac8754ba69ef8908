"""decode.py's compiled static-cache loop against transformers' generate (the eager reference) on tiny Llama
and Gemma3 models: the same greedy tokens, a fixed graph count, refusal of what the graph would not contain.

The compiled path runs on torch.compile's aot_eager CPU backend here (the same traced graph as inductor,
without code generation): `uv run pytest -k compiled`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from steer_heal import decode
from steer_heal.errors import UserError
from steer_heal.generate import Row, Sampling, generate
from steer_heal.hooks import steer

VOCAB, HIDDEN, PAD, EOS = 320, 64, 0, 1
GREEDY = Sampling(10, do_sample=False)


class Tok:
    """The little of a tokenizer generate() uses: pad / eos ids and decode."""

    pad_token_id, eos_token_id = PAD, EOS

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def tiny(kind: str):
    """2 layers, hidden 64, 4 query heads on 2 K/V heads (GQA); Gemma3: one sliding layer (window 4, shorter
    than the prompts) and one full layer."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD,
                  eos_token_id=EOS, bos_token_id=2)  # fmt: skip
    if kind == "gemma3":
        cfg = Gemma3TextConfig(**common, head_dim=16, sliding_window=4,
                               layer_types=["sliding_attention", "full_attention"])  # fmt: skip
        model = Gemma3ForCausalLM(cfg)
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.eval().requires_grad_(False)
    decode.decoder(model, backend="aot_eager")
    return model


def rows(coeffs) -> list[Row]:
    """Five prompts of different lengths (left-padded in one batch), one coefficient each."""
    g = torch.Generator().manual_seed(1)
    lengths = [5, 9, 7, 3, 6]
    return [Row(i, "", torch.randint(3, VOCAB, (n,), generator=g).tolist(), c, c)
            for i, (n, c) in enumerate(zip(lengths, coeffs))]  # fmt: skip


def vectors() -> dict[int, torch.Tensor]:
    """A vector on block 0 only: block 1's hook adds its zero row (c x 0 = 0, exactly)."""
    return {0: torch.randn(HIDDEN, generator=torch.Generator().manual_seed(2)) * 0.5}


def ids(model, rs, v, decode_mode, sampling=GREEDY, seed=0):
    comps = generate(model, Tok(), rs, v, sampling=sampling, batch_size=4, decode=decode_mode, seed=seed)
    return [c.ids for c in comps]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine a second OpenMP thread made each of these tiny matmuls
    take 16 ms instead of 0.03 ms (waiting for a core), which is most of this file's time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return tiny(request.param)


def test_compiled_greedy_equals_eager_across_calls(model):
    """Five rows in batches of 4 (the second padded with three coefficient-0 rows), three calls with other
    coefficients (0 and negatives among them): the same tokens as generate, and no graph after the first."""
    dec = decode.decoder(model)
    steered_somewhere = False
    graphs = None
    for coeffs in [(0.0, 2.0, -1.5, 1.0, 0.5), (-2.0, 0.0, 3.0, 0.0, -0.7), (1.0, 1.0, -1.0, 4.0, 0.0)]:
        rs = rows(coeffs)
        eager = ids(model, rs, vectors(), "eager")
        assert ids(model, rs, vectors(), "compiled") == eager, coeffs
        if graphs is None:
            graphs = dec.graphs
        plain = ids(model, rs, None, "eager")
        steered_somewhere |= any(a != b for a, b, c in zip(eager, plain, coeffs) if c != 0)
    assert steered_somewhere, "steering changed no greedy token: the test would not see stale steering"
    assert dec.graphs == graphs and dec.recompiles == 0, (dec.graphs, dec.recompiles)


def test_compiled_all_zero_coefficients_are_no_steering(model):
    """All-zero coefficients with vectors give the unsteered tokens; so does no steering, on the same graph.
    (transformers' output-capturing hooks, installed by asking for hidden states once, are allowed.)"""
    dec = decode.decoder(model)
    model(torch.tensor([[3, 4, 5]]), output_hidden_states=True)
    assert decode.foreign_hooks(model) == [] and any(b._forward_hooks for b in model.model.layers)
    rs = rows([0.0] * 5)
    plain = ids(model, rs, None, "eager")
    assert ids(model, rs, vectors(), "compiled") == plain
    before = dec.graphs
    assert ids(model, rs, None, "compiled") == plain
    assert dec.graphs == before


def test_compiled_sampling_follows_the_seed(model):
    """Top-p sampling on a full batch draws the same tokens as generate for the same seed (transformers'
    warpers, one multinomial per step); another seed draws others."""
    rs = rows([0.0, 1.0, -1.0, 2.0])[:4]
    s = Sampling(10, temperature=0.8, top_p=0.9)
    eager = ids(model, rs, vectors(), "eager", s, seed=3)
    assert ids(model, rs, vectors(), "compiled", s, seed=3) == eager
    assert ids(model, rs, vectors(), "compiled", s, seed=4) != eager


def test_compiled_follows_the_adapter_stack():
    """A student with two baked LoRA adapters (random B, so they change the tokens): the compiled step runs
    the same peft modules and re-specialises when they switch off (`student.base()`), then reuses its graphs."""
    from peft import LoraConfig

    from steer_heal.student import Student

    st = Student(tiny("llama"))
    plain = ids(st.model, rows([0.0] * 5), None, "eager")
    for r in range(2):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                          init_lora_weights=False)  # fmt: skip
        st.add_adapter(r, lora)
        st.bake()
    dec = decode.decoder(st.model)
    rs = rows((0.0, 2.0, -1.5, 1.0, 0.5))
    student = ids(st.model, rs, vectors(), "eager")
    assert ids(st.model, rs, vectors(), "compiled") == student
    assert ids(st.model, rows([0.0] * 5), None, "compiled") != plain, "the adapters changed nothing"
    with st.base():
        assert ids(st.model, rs, vectors(), "compiled") == ids(st.model, rs, vectors(), "eager")
    graphs = dec.graphs
    assert ids(st.model, rs, vectors(), "compiled") == student
    assert dec.graphs == graphs


def test_compiled_refuses_other_hooks_and_generation_options():
    model = tiny("llama")
    rs = rows([1.0] * 5)
    with steer(model, vectors(), 1.0):  # a hook the compiled graph would not contain
        with pytest.raises(UserError, match="other hooks.*LlamaDecoderLayer|other hooks.*layers.0"):
            ids(model, rs, None, "compiled")
    model.generation_config.no_repeat_ngram_size = 3
    with pytest.raises(UserError, match="no_repeat_ngram_size=3"):
        ids(model, rs, None, "compiled")
    assert decode.unsupported_kwargs(dict(eos_token_id=[1], repetition_penalty=1.0, top_k=0, top_p=0.9)) == []
    assert decode.unsupported_kwargs(dict(stop_strings=["User:"], top_k=0)) == ["stop_strings=['User:']"]


def test_compiled_masks_equal_transformers_masks():
    """Our mask (padding, causal, sliding window) against transformers' sdpa_mask for the same inputs."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    q = torch.arange(8)
    for window, fn in ((None, causal_mask_function), (3, sliding_window_causal_mask_function(3))):
        theirs = sdpa_mask(batch_size=2, q_length=8, kv_length=8, mask_function=fn, attention_mask=valid,
                           allow_is_causal_skip=False)  # fmt: skip
        assert torch.equal(decode.attention_mask(valid, q, window), theirs)


def test_kv_read_bytes_of_gemma():
    """gemma-3-4b-it, bf16: 34 layers x 2 (K, V) x 4 K/V heads x 256 x 2 bytes = 139,264 B per token; past
    the 1024-token window the sliding layers (5 in 6) stop growing."""
    from transformers import AutoConfig

    d = json.loads((Path(__file__).resolve().parents[1] / "data" / "gemma-3-4b-it.text_config.json").read_text())
    cfg = AutoConfig.for_model(**d)
    per = 2 * 4 * 256 * 2
    assert per * 34 == 139_264 and decode.kv_read_bytes(cfg, torch.bfloat16, 1) == 139_264
    assert decode.kv_read_bytes(cfg, torch.bfloat16, 512) == 34 * per * 512
    n_full = cfg.layer_types.count("full_attention")
    assert decode.kv_read_bytes(cfg, torch.bfloat16, 2048) == per * (n_full * 2048 + (34 - n_full) * 1024)


def test_decode_mode_auto_is_eager_on_cpu():
    assert decode.resolve("auto", torch.device("cpu")) == "eager"
    assert decode.resolve("auto", torch.device("cuda")) == "compiled"
    with pytest.raises(UserError, match="--decode 'fast'"):
        decode.resolve("fast", torch.device("cpu"))
    assert decode.cache_length(129) == 256 and decode.cache_length(128) == 128


def test_decode_bound_counts_the_kv_bytes():
    """No K/V: the weights-only bound rows x bandwidth / weight bytes; K/V as large as the weights on every
    step: half of it."""
    from scripts.bench import decode_bound

    assert decode_bound(1000, [0, 0, 0], 4, 1e6) == 4 * 1e6 / 1000
    assert decode_bound(1000, [1000, 1000], 4, 1e6) == 2 * 1e6 / 1000

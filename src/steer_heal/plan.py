"""Will the resolved config fit this GPU? Peak memory per stage, estimated from the model's config alone.

    uv run python -m steer_heal.run --preset gemma --plan [--plan-memory-gb 24]

No weight is loaded: the architecture is built on the meta device (exact parameter counts, the LoRA
targets of the band) from the model's config (a local dir, the cached embedded model, a random:<json>,
a hub id from the local cache, or, offline, the shipped gemma-3-4b-it text config for that id). Each
stage's peak is the weights plus that stage's largest live set, with sizes from the config (prompt
lengths from the data files at ~1.4 tokens per word plus the chat template):

  weights      n_params x bytes(dtype)
  generate     + KV cache  B_gen x layers x 2 x kv_heads x head_dim x (P + new) x bytes
               + prefill   B_gen x P x (2 I + 4 H) x bytes   (one block's MLP and attention projections)
               + logits    2 x B_gen x V x 4                   (fp32 scores, processed and raw)
  heal         + LoRA      16 bytes per adapter parameter      (fp32 weight, grad, two AdamW moments)
               + blocks    layers x B x L x (8 H + 4 I) x bytes, or with --grad-checkpoint
                           layers x B x L x H x bytes + one block's (8 H + 4 I)
               + hidden    (layers + 1) x B x L x H x bytes    (output_hidden_states, student and reference)
               + loss      chunk x V x 4 x (4 + 2 with a barrier / teacher)   (one chunk's log-probs)
  eval         + B_eval x 2 x T x (2 I + 4 H) x bytes + B_eval x 2 x 3 x V x 4
These are estimates to plan with (allocator slack and kernel workspaces come on top); docs/benchmarks.md
compares them with measured peaks where they were measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tabulate import tabulate

from steer_heal import data, losses, models
from steer_heal.config import RunConfig
from steer_heal.errors import UserError

GiB = 2**30
KNOWN_CONFIGS = {"google/gemma-3-4b-it": data.DATA / "gemma-3-4b-it.text_config.json"}
TOKENS_PER_WORD = 1.4


def model_config(cfg: RunConfig):
    """The model's config without its weights (see the module docstring for where it comes from)."""
    from transformers import AutoConfig, LlamaConfig

    spec = cfg.model
    if spec == models.TINY:
        return LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    if spec.startswith(models.RANDOM) or spec in KNOWN_CONFIGS:
        path = Path(spec[len(models.RANDOM) :]) if spec.startswith(models.RANDOM) else KNOWN_CONFIGS[spec]
        if spec in KNOWN_CONFIGS:
            try:
                return AutoConfig.from_pretrained(spec)  # the hub's (or cache's) full config when reachable
            except OSError:
                pass  # offline: the shipped text config of the same model
        return AutoConfig.for_model(**json.loads(path.read_text(encoding="utf-8")))
    src, kw = models.model_source(spec)
    try:
        return AutoConfig.from_pretrained(src, **kw)
    except OSError as e:
        raise UserError(f"--plan: no config for --model {spec!r} here ({str(e).splitlines()[0]})") from e


def meta_model(mcfg):
    """The architecture on the meta device: shapes without memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(mcfg)


def prompt_tokens(path: Path | None, default: str, template: int = 40) -> int:
    """The longest generation prompt in tokens, estimated from its words."""
    return int(max(len(t.split()) for t in data.texts(path, default)) * TOKENS_PER_WORD) + template


def estimate(cfg: RunConfig) -> dict:
    """Bytes per stage (weights included) and the pieces each is made of."""
    from steer_heal.student import lora_targets

    mcfg = model_config(cfg)
    text = getattr(mcfg, "text_config", None) or mcfg
    m = meta_model(mcfg)
    device = "cuda" if cfg.device == "auto" else cfg.device  # a plan is for the GPU run: auto dtype = bf16 there
    nbytes = torch.finfo(models.resolve_dtype(cfg.dtype, device)).bits // 8
    H, inter, V, nl = text.hidden_size, text.intermediate_size, text.vocab_size, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or H // text.num_attention_heads
    kv = text.num_key_value_heads
    weights = sum(p.numel() for p in m.parameters()) * nbytes
    g, h, e = cfg.generate, cfg.heal, cfg.eval
    P = prompt_tokens(g.prompts_file, "dilemmas.jsonl")
    kv_cache = g.gen_batch_size * nl * 2 * kv * head_dim * (P + g.max_new_tokens) * nbytes
    prefill = g.gen_batch_size * P * (2 * inter + 4 * H) * nbytes
    gen_logits = 2 * g.gen_batch_size * V * 4
    names = lora_targets(m, h.lora_layers, h.lora_targets)
    mods = dict(m.named_modules())
    lora = sum(h.lora_r * (mods[n].in_features + mods[n].out_features) for n in names) * 16
    L, B = P + g.max_new_tokens, h.heal_batch_size
    per_block = B * L * (8 * H + 4 * inter) * nbytes
    blocks = nl * B * L * H * nbytes + per_block if h.grad_checkpoint else nl * per_block
    hidden = 2 * (nl + 1) * B * L * H * nbytes
    extra = 2 if h.reg != "nll" else 0
    extra += 2 if h.heal_target != "sft" else 0
    loss = min(h.loss_chunk, B * g.max_new_tokens) * V * 4 * (4 + extra)
    # the filter scores a generation batch under the original model: one decoder forward (no KV cache, no
    # per-layer hidden states kept), the LM head in chunks of positions (losses.token_nlls), fp32
    score_act = g.gen_batch_size * L * (2 * inter + 4 * H) * nbytes
    score_chunk = losses.SCORE_CHUNK * V * 4 * 2
    T = 110  # an eval row: instruction, scenario, options, prefill
    eval_act = e.eval_batch_size * 2 * T * (2 * inter + 4 * H) * nbytes + e.eval_batch_size * 2 * 3 * V * 4
    return {
        "weights": weights,
        "stages": {
            "generate": weights + kv_cache + prefill + gen_logits,
            "filter": weights + score_act + score_chunk,
            "heal": weights + lora + blocks + hidden + loss,
            "eval": weights + eval_act,
        },
        "parts": {"kv_cache": kv_cache, "prefill": prefill, "gen_logits": gen_logits, "lora_and_adam": lora,
                  "heal_blocks": blocks, "heal_hidden": hidden, "loss_chunk": loss, "filter_activations": score_act,
                  "filter_chunk": score_chunk, "eval_activations": eval_act},
        "sizes": {"params": weights // nbytes, "bytes_per_param": nbytes, "prompt_tokens": P, "heal_len": L,
                  "layers": nl, "hidden": H, "intermediate": inter, "vocab": V, "lora_modules": len(names)},
    }  # fmt: skip


def available_gib(requested: float | None) -> tuple[float, str]:
    if requested is not None:
        return requested, "--plan-memory-gb"
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GiB, torch.cuda.get_device_name(0)
    return 24.0, "no GPU here: a 24 GiB card"


def report(cfg: RunConfig, memory_gb: float | None = None) -> tuple[str, bool]:
    """The plan as text, and whether every stage fits."""
    est = estimate(cfg)
    have, where = available_gib(memory_gb)
    rows = [{"stage": k, "peak GiB": round(v / GiB, 2), "fits": "yes" if v / GiB <= have else "NO"}
            for k, v in est["stages"].items()]  # fmt: skip
    parts = [{"part": k, "GiB": round(v / GiB, 3)} for k, v in est["parts"].items()]
    ok = all(r["fits"] == "yes" for r in rows)
    s = est["sizes"]
    size = (
        f"{s['params'] / 1e9:.2f} B params, {s['bytes_per_param']} bytes each, {s['layers']} layers, vocab {s['vocab']}"
    )
    head = f"plan for --model {cfg.model} ({size}), preset {cfg.preset}; against {have:.1f} GiB ({where})"
    tables = [tabulate(x, headers="keys", tablefmt="github") for x in (rows, parts)]
    verdict = (
        "every stage fits" if ok else "does NOT fit: lower the batch sizes or --max-new-tokens, or --grad-checkpoint"
    )
    return f"{head}\n\n{tables[0]}\n\n{tables[1]}\n\n{verdict}\n", ok

"""Compiled, static-cache steered decoding: prefill once, then one compiled single-token step per new token.

    comps = generate(model, tok, rows, vectors, sampling=..., batch_size=64, decode="compiled")  # generate.py
    dec = decoder(model, backend="aot_eager")                      # one per model (and backend), made once
    new = dec.run(model, prompts, coeffs, vectors, sampling, stops, pad_id, width=64)   # new ids per row

In: the prompts' token ids (left-padded here), one steering coefficient per row and the per-layer vectors;
out: each row's new token ids, the same greedy tokens as `model.generate` gives (tests/test_decode.py).
`model.generate` in generate.py stays the reference and the CPU default (`--decode auto`).

Why it is built this way (each point is a trap of compiling `model.generate`):
- torch.compile does not guard on forward hooks (`skip_nnmodule_hook_guards`), so `hooks.steer`, which adds
  and removes hooks on every call, would replay stale steering or none. Here the hook functions are made once
  per model (one per block), are always the same, and read fixed-address buffers (a vector per layer, a
  coefficient per row) that each call overwrites in place: one graph serves steered and unsteered rows, and
  c = 0 adds exactly 0. Any other hook on the model is refused: the graph would not contain it.
- One static KV cache per (batch, cache length), owned here and reset per call: a fresh cache per call (what
  `generate(cache_implementation="static")` builds) moves the addresses a CUDA graph recorded. The last chunk
  of rows is padded to the batch with coefficient-0 rows, so the shape never changes.
- Every layer keeps the whole sequence; a sliding-window layer differs only in its mask, built from a tensor
  position. transformers' static sliding cache layer branches on a Python int, which recompiles every step.
- A single query token attends on the K/V heads (query heads grouped per K/V head), as eager transformers
  does; under compile transformers repeats K/V for every query head instead (n_rep x the KV bytes).
- `fullgraph=True`: a graph break fails loudly instead of running part of the step eagerly, and a hit of the
  recompile limit raises instead of falling back to eager.
"""

from __future__ import annotations

import math
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn
from transformers import AttentionInterface
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from steer_heal.errors import UserError
from steer_heal.hooks import _hidden, _replace_hidden, _resolve, add_steering
from steer_heal.models import decoder_layers, input_device, unwrap
from steer_heal.tokens import pad

MODES = ("eager", "compiled", "auto")
PACKED_SDPA = "steer_heal_packed_sdpa"  # the attention implementation the compiled path runs under
CACHE_STEP = 128  # cache lengths are multiples of this, so prompts of different lengths share one graph
RECOMPILE_LIMIT = 64  # graphs per step function: (batch, cache length) x adapter states over a run


def resolve(decode: str, device: torch.device) -> str:
    """`eager` or `compiled`; auto = compiled on CUDA (where the eager loop ran at 3-6 % of the bandwidth
    bound), eager elsewhere (the CPU default stays what was measured)."""
    if decode not in MODES:
        raise UserError(f"--decode {decode!r}: valid: {', '.join(MODES)}")
    if decode == "auto":
        return "compiled" if device.type == "cuda" else "eager"
    return decode


def default_backend(device: torch.device) -> tuple[str, str | None]:
    """(torch.compile backend, mode): inductor with CUDA graphs on a GPU (one replay per token instead of a
    few hundred kernel launches); inductor on a CPU."""
    return ("inductor", "reduce-overhead") if device.type == "cuda" else ("inductor", None)


def cache_length(need: int, step: int = CACHE_STEP) -> int:
    """`need` rounded up to a multiple of `step`: chunks whose prompt + new tokens fit share one cache."""
    return step * math.ceil(need / step)


def kv_read_bytes(config, dtype: torch.dtype, context: int) -> int:
    """Bytes of K and V one decode step must read for one row whose context is `context` tokens:
    sum over layers of 2 x kv_heads x head_dim x bytes x min(context, window) (no window on a full layer).

    gemma-3-4b-it in bf16, within its 1024-token window: 34 x 2 x 4 x 256 x 2 = 139,264 B per token."""
    heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * heads * dim * torch.finfo(dtype).bits // 8
    windows = layer_windows(config) or {}
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return sum(per_token * min(context, windows.get(t) or context) for t in types[: config.num_hidden_layers])


def layer_windows(config) -> dict[str, int | None] | None:
    """The masks a model's forward takes: None = one causal mask for every layer; else a window per layer type
    ({"full_attention": None, "sliding_attention": W}: models with sliding layers take a dict of masks)."""
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    unknown = types - {"full_attention", "sliding_attention"}
    if unknown:
        raise UserError(
            f"compiled decoding supports full and sliding attention layers, not {sorted(unknown)}; use --decode eager"
        )
    if types == {"full_attention"}:
        if getattr(config, "layer_types", None) is None and getattr(config, "sliding_window", None) is not None:
            raise UserError("compiled decoding: a sliding window without layer_types in the config; use --decode eager")
        return None
    return {"full_attention": None, "sliding_attention": int(config.sliding_window)}


def attention_mask(valid: torch.Tensor, q: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, T, L] bool: the query at cache index q[t] sees key j iff valid[b, j] (not padding) and j <= q[t]
    and, for a sliding layer of window W, j > q[t] - W (transformers' sliding_window_overlay: W keys, itself
    included)."""
    j = torch.arange(valid.shape[1], device=valid.device)
    see = j[None, :] <= q[:, None]
    if window is not None:
        see = see & (j[None, :] > q[:, None] - window)
    return valid[:, None, None, :] & see[None, None]


def masks(valid: torch.Tensor, q: torch.Tensor, windows: dict[str, int | None] | None):
    """The `attention_mask` argument: one 4D mask, or a {layer_type: 4D mask} dict (see layer_windows)."""
    if windows is None:
        return attention_mask(valid, q, None)
    return {t: attention_mask(valid, q, w) for t, w in windows.items()}


def next_token(logits: torch.Tensor, step: int, sampling, stops: torch.Tensor) -> torch.Tensor:
    """Next ids [B] from fp32 logits [B, V], in transformers' order: before step min_new_tokens the stop ids
    are banned (-inf), then temperature and top-p (its own warpers), then softmax + multinomial, or argmax."""
    if step < sampling.min_new_tokens:
        banned = torch.isin(torch.arange(logits.shape[-1], device=logits.device), stops)
        logits = torch.where(banned, -math.inf, logits)
    if not sampling.do_sample:
        return logits.argmax(-1)
    if sampling.temperature != 1.0:
        logits = TemperatureLogitsWarper(sampling.temperature)(None, logits)
    if sampling.top_p < 1.0:
        logits = TopPLogitsWarper(sampling.top_p)(None, logits)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1).squeeze(1)


# transformers adds a logits processor for each of these when the model's generation config sets it; the
# compiled loop implements only min_new_tokens, temperature and top-p, so it refuses a model that sets others.
_UNSUPPORTED = {
    "sequence_bias": lambda v: v is not None,
    "encoder_repetition_penalty": lambda v: v not in (None, 1.0),
    "no_repeat_ngram_size": lambda v: bool(v),
    "bad_words_ids": lambda v: v is not None,
    "min_length": lambda v: bool(v),
    "forced_bos_token_id": lambda v: v is not None,
    "forced_eos_token_id": lambda v: v is not None,
    "remove_invalid_values": lambda v: bool(v),
    "exponential_decay_length_penalty": lambda v: v is not None,
    "suppress_tokens": lambda v: v is not None,
    "begin_suppress_tokens": lambda v: v is not None,
    "top_h": lambda v: v is not None,
    "min_p": lambda v: v is not None,
    "typical_p": lambda v: v not in (None, 1.0),
    "epsilon_cutoff": lambda v: bool(v),
    "eta_cutoff": lambda v: bool(v),
    "watermarking_config": lambda v: v is not None,
    "renormalize_logits": lambda v: bool(v),
    # stop_strings (a prompt format's next-turn text, formats.py) is absent on purpose: the loop runs on past
    # it and generate.cut drops the text and what follows, so the completion's ids are the same.
}


def unsupported_options(gen_config) -> list[str]:
    """'name=value' for each generation-config setting the compiled loop would silently ignore."""
    return [f"{k}={getattr(gen_config, k)!r}" for k, bad in _UNSUPPORTED.items() if bad(getattr(gen_config, k, None))]


# generate.py's keyword arguments to model.generate that the compiled loop reproduces (stop ids, pad id and
# Sampling's fields); a new one there would be silently dropped here, so unsupported_kwargs names it instead
HONOURED = {"eos_token_id", "pad_token_id", "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p"}


def unsupported_kwargs(kw: dict) -> list[str]:
    """'name=value' for each model.generate argument the compiled loop would not apply (repetition_penalty 1
    and top_k 0 are the identity)."""
    neutral = {"repetition_penalty": 1.0, "top_k": 0}
    return [f"{k}={v!r}" for k, v in kw.items() if k not in HONOURED and neutral.get(k, object()) != v]


def foreign_hooks(model: nn.Module) -> list[str]:
    """'<module>: <hook>' for every forward hook on the model that the compiled step would not contain.

    transformers' own output-capturing hooks are allowed: they record nothing unless hidden states are asked
    for, which the step never does."""
    out = []
    global_hooks = {**nn.modules.module._global_forward_hooks, **nn.modules.module._global_forward_pre_hooks}
    out += [f"global: {getattr(h, '__qualname__', h)}" for h in global_hooks.values()]
    for name, m in model.named_modules():
        for h in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]:
            if getattr(h, "__module__", "") != "transformers.utils.output_capturing":
                out.append(f"{name or type(model).__name__}: {getattr(h, '__qualname__', h)}")
        if hasattr(m, "_hf_hook"):
            out.append(f"{name}: accelerate's device hook (--device-map)")
    return out


def packed_gqa_sdpa(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' sdpa attention, except that a single query token always attends on the K/V heads:
    query [B, H, 1, D] -> [B, H_kv, n_rep, D] against K/V [B, H_kv, L, D] (the mask [B, 1, 1, L] broadcasts),
    which is what eager transformers does; under compile it would repeat K and V n_rep times instead."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or n_rep == 1 or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("sdpa attention does not support softcap; use --decode eager")
    b, h, _, d = query.shape
    q = query.reshape(b, h // n_rep, n_rep, d)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_gqa_sdpa)


class StaticKV:
    """Per-layer K/V buffers [B, H_kv, L, D] at fixed addresses, written at `index` (a 0-d tensor, so the
    compiled step does not specialise on the position). Duck-types the `update` of transformers' Cache: the
    attention layers of Llama and Gemma3 call only that."""

    def __init__(self, n_layers: int, batch: int, length: int, device):
        self.batch, self.length = batch, length
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.index = torch.zeros((), dtype=torch.long, device=device)
        torch._dynamo.mark_static_address(self.index)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is None:  # allocated at the first (eager) prefill, in the layer's shapes and dtype
            for store, x in ((self.keys, k), (self.values, v)):
                store[layer_idx] = torch.zeros((self.batch, x.shape[1], self.length, x.shape[-1]), dtype=x.dtype,
                                               device=x.device)  # fmt: skip
                torch._dynamo.mark_static_address(store[layer_idx])  # a CUDA graph replays on these addresses
        where = self.index + torch.arange(k.shape[2], device=k.device)
        self.keys[layer_idx].index_copy_(2, where, k)
        self.values[layer_idx].index_copy_(2, where, v)
        return self.keys[layer_idx], self.values[layer_idx]

    def reset(self) -> None:
        """Zeros, not just index 0: a masked key still multiplies its value by 0, and 0 x inf left over from an
        earlier, over-steered call would be NaN."""
        for t in (*self.keys, *self.values):
            if t is not None:
                t.zero_()
        self.index.zero_()


@dataclass
class Slot:
    """What one (batch, cache length) owns: the cache, which keys are real (not left padding) and the
    per-row coefficients, all at fixed addresses."""

    kv: StaticKV
    valid: torch.Tensor  # [B, L] bool
    coeff: torch.Tensor  # [B] fp32
    stepped: bool = False  # has run a compiled step (a later compile on it is a recompile)

    @classmethod
    def new(cls, n_layers: int, batch: int, length: int, device) -> Slot:
        s = cls(StaticKV(n_layers, batch, length, device), torch.ones(batch, length, dtype=torch.bool, device=device),
                torch.zeros(batch, dtype=torch.float32, device=device))  # fmt: skip
        torch._dynamo.mark_static_address(s.valid)
        torch._dynamo.mark_static_address(s.coeff)
        return s

    def reset(self, prompt_mask: torch.Tensor, coeffs: list[float]) -> None:
        """Keys 0..T0-1 are the left-padded prompt (its mask); every later key is a generated token."""
        self.kv.reset()
        self.valid.fill_(True)
        self.valid[:, : prompt_mask.shape[1]] = prompt_mask.bool()
        self.coeff.copy_(torch.tensor(coeffs, dtype=torch.float32))


def _step(model, kv: StaticKV, valid, windows, ids, pos):
    """One token per row: write its K/V at kv.index, attend under the masks, advance the index. fp32 logits."""
    out = model(input_ids=ids, position_ids=pos, attention_mask=masks(valid, kv.index.view(1), windows),
                past_key_values=kv, use_cache=True)  # fmt: skip
    kv.index.add_(1)
    return out.logits[:, -1].float()


class Decoder:
    """The compiled step, the steering buffers and the caches of one model; see the module docstring."""

    def __init__(self, backend: str, mode: str | None):
        self.backend, self.mode = backend, mode
        self.step = torch.compile(_step, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        self.slots: dict[int, Slot] = {}  # by batch width
        self.vectors: torch.Tensor | None = None  # [n_blocks, H] fp32
        self.active: Slot | None = None  # the slot the steering hooks read while a call runs
        self.hook_fns: list = []
        self.graphs = self.recompiles = 0
        self.compile_s = 0.0

    def _hook(self, L: int):
        def steer_fixed(_mod, _inp, output):
            return _replace_hidden(output, add_steering(_hidden(output), self.vectors[L], self.active.coeff))

        return steer_fixed

    @contextmanager
    def _installed(self, model: nn.Module):
        """The same hook functions on the same blocks for every call (the graph traced them), removed after."""
        blocks = decoder_layers(model)
        if not self.hook_fns:
            self.hook_fns = [self._hook(L) for L in range(len(blocks))]
        handles = []
        try:
            handles = [b.register_forward_hook(f) for b, f in zip(blocks, self.hook_fns)]
            yield
        finally:
            for h in handles:
                h.remove()

    def _slot(self, model: nn.Module, width: int, need: int, device) -> Slot:
        """The batch's slot if its cache is long enough, else a longer one in its place (a new graph)."""
        s = self.slots.get(width)
        if s is None or s.kv.length < need:
            self.slots.pop(width, None)  # free the shorter cache before allocating
            s = self.slots[width] = Slot.new(len(decoder_layers(model)), width, cache_length(need), device)
        return s

    def _load_vectors(self, model: nn.Module, vectors: dict[int, torch.Tensor] | None, device) -> None:
        """Overwrite the vector buffer in place: the steered layers' vectors, zeros on every other block."""
        blocks = decoder_layers(model)
        if self.vectors is None:
            self.vectors = torch.zeros(len(blocks), model.config.get_text_config().hidden_size, device=device)
            torch._dynamo.mark_static_address(self.vectors)
        self.vectors.zero_()
        for L, _ in _resolve(model, vectors or {}):
            self.vectors[L].copy_(vectors[L])

    def release(self) -> None:
        """Drop the caches (after out-of-memory: the retry uses smaller batches)."""
        self.slots.clear()
        self.active = None

    def refuse(self, model: nn.Module) -> None:
        """Raise UserError, in one line, for a model this path would decode differently from generate()."""
        hooks = foreign_hooks(model)
        if hooks:
            raise UserError(f"compiled decoding refuses a model with other hooks (the graph would not run them): "
                            f"{'; '.join(hooks[:4])}; remove them or use --decode eager")  # fmt: skip
        impl = model.config._attn_implementation
        if impl not in ("sdpa", PACKED_SDPA):
            raise UserError(f"compiled decoding runs sdpa attention; this model uses {impl!r}: use --decode eager")
        bad = unsupported_options(model.generation_config)
        if bad:
            raise UserError(f"compiled decoding does not apply the model's {', '.join(bad)}: use --decode eager")

    @contextmanager
    def _packed_attention(self, model: nn.Module):
        cfg, was = model.config, model.config._attn_implementation
        cfg._attn_implementation = PACKED_SDPA
        try:
            yield
        finally:
            cfg._attn_implementation = was

    def _call_step(self, model, slot: Slot, windows, ids, pos) -> torch.Tensor:
        """The compiled step, counting the graphs it compiles (a compile on a slot that has stepped is a
        recompile) and the seconds those calls took."""
        before, t0 = torch._dynamo.utils.counters["stats"]["unique_graphs"], time.perf_counter()
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are consumed
        logits = self.step(model, slot.kv, slot.valid, windows, ids, pos)
        new = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
        if new:
            self.graphs += new
            self.recompiles += new if slot.stepped else new - 1
            self.compile_s += time.perf_counter() - t0
            logger.info(
                f"compiled decode step ({self.backend}): batch {slot.kv.batch}, cache {slot.kv.length}, "
                f"{time.perf_counter() - t0:.1f} s; {self.graphs} graph(s), {self.recompiles} recompile(s)"
            )
        slot.stepped = True
        return logits

    @torch.no_grad()
    def run(self, model: nn.Module, prompts: list[list[int]], coeffs: list[float], vectors, sampling,
            stops: list[int], pad_id: int, width: int) -> list[list[int]]:  # fmt: skip
        """New token ids per prompt (len(prompts) <= width), padded after a stop id with pad_id, as
        `model.generate` returns them; prefill runs eagerly, every later token through the compiled step."""
        model = unwrap(model)  # the LoRA layers sit inside it: peft's wrapper only forwards to it
        if not 0 < len(prompts) <= width:
            raise ValueError(f"{len(prompts)} prompts for a batch of {width}")
        self.refuse(model)
        dev, n = input_device(model), len(prompts)
        enc = pad(prompts + [prompts[0]] * (width - n), pad_id, "left", dev)  # filler rows: coefficient 0
        slot = self._slot(model, width, enc["input_ids"].shape[1] + sampling.max_new_tokens, dev)
        slot.reset(enc["attention_mask"], [float(c) if vectors else 0.0 for c in coeffs] + [0.0] * (width - n))
        self._load_vectors(model, vectors, dev)
        windows = layer_windows(model.config.get_text_config())
        limits = torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True)
        self.active = slot
        try:
            with self._installed(model), self._packed_attention(model), limits:
                logits = self._prefill(model, slot, enc, windows)
                out = self._decode(model, slot, windows, logits, enc["position_ids"][:, -1:], n, sampling,
                                   torch.tensor(stops, device=dev), pad_id)  # fmt: skip
        finally:
            self.active = None
        return out[:n].tolist()

    @staticmethod
    def _prefill(model, slot: Slot, enc: dict, windows) -> torch.Tensor:
        """The prompts' K/V into the cache (eagerly: every prompt length would be another graph); fp32 logits
        of each row's last prompt token."""
        t0 = enc["input_ids"].shape[1]
        q = torch.arange(t0, device=slot.valid.device)
        out = model(input_ids=enc["input_ids"], position_ids=enc["position_ids"], past_key_values=slot.kv,
                    attention_mask=masks(slot.valid, q, windows), use_cache=True, logits_to_keep=1)  # fmt: skip
        slot.kv.index.fill_(t0)
        return out.logits[:, -1].float()

    def _decode(self, model, slot: Slot, windows, logits, pos, n: int, sampling, stops, pad_id: int) -> torch.Tensor:
        """[width, steps] new ids, generate's loop: a finished row gets pad_id; stop once every real row has
        hit a stop id or max_new_tokens is reached (filler rows, n and beyond, never hold it open)."""
        done = torch.arange(slot.kv.batch, device=logits.device) >= n
        out = []
        for step in range(sampling.max_new_tokens):
            tok = torch.where(done, pad_id, next_token(logits, step, sampling, stops))
            out.append(tok)
            done = done | torch.isin(tok, stops)
            if step + 1 == sampling.max_new_tokens or bool(done.all()):
                break
            pos = pos + 1
            logits = self._call_step(model, slot, windows, tok[:, None], pos)
        return torch.stack(out, 1)


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder(model: nn.Module, backend: str | None = None, mode: str | None = None) -> Decoder:
    """The model's one decoder, made on first use with `backend` (default: default_backend of its device);
    naming another backend replaces it (tests pick a fast-compiling CPU backend this way)."""
    base = unwrap(model)
    dec = _DECODERS.get(base)
    if dec is None or (backend is not None and (backend, mode) != (dec.backend, dec.mode)):
        backend, mode = (backend, mode) if backend is not None else default_backend(input_device(base))
        dec = _DECODERS[base] = Decoder(backend, mode)
    return dec

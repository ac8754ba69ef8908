"""Run configuration: one tyro dataclass per stage, nested in `RunConfig`, and the named presets.

Flags are flat on the command line (`--reg kl_rev`, not `--heal.reg kl_rev`), so every field name is
unique across stages. A preset is a plain `RunConfig` object; `parse_args` picks it from
`--preset NAME` (or `--fast-dev-run`) and then lets every other flag override its fields.

    uv run python -m steer_heal.run --help
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tyro

from steer_heal.errors import UserError

Reg = Literal["nll", "kl_rev", "kl_fwd"]
KlAgg = Literal["mean", "rmse", "p95", "max"]
BarrierRef = Literal["base", "prev"]
PresetName = Literal["fast", "smol", "gemma"]


@dataclass
class ExtractConfig:
    persona: str = "care_vs_authority"
    """Persona pair by name from data/personas.json (see data/README.md)."""
    persona_pos: str | None = None
    """Override the positive persona text (requires --persona-neg too)."""
    persona_neg: str | None = None
    """Override the negative persona text (requires --persona-pos too)."""
    personas_file: Path | None = None
    """A JSON file of extra persona pairs, same schema as data/personas.json."""
    contexts_file: Path | None = None
    """User messages the persona pair is read over (JSONL with a `text` field); default data/contexts.jsonl."""
    n_contexts: int = 256
    """How many contexts to use (the first N of the file, shuffled by seed)."""
    steer_layers: tuple[float, float] = (0.45, 0.55)
    """Steering band as fractions of depth [lo, hi]; the vector is read and added at these blocks."""
    normalize: bool = False
    """Scale each layer's vector to unit norm (raw mean difference by default)."""
    extract_batch_size: int = 32
    """Prompts per forward pass when reading activations."""


@dataclass
class GenerateConfig:
    prompts_file: Path | None = None
    """Generation prompts (JSONL, `text` field); default data/dilemmas.jsonl."""
    n_prompts: int = 16
    """Prompts per probe/collect batch of the dose controller."""
    alphas: tuple[float, ...] = (1.0, 2.0, 3.0)
    """Steering strengths (multiples of the raw vector) mixed in each generate call."""
    max_new_tokens: int = 64
    """Completion length cap in tokens."""
    temperature: float = 1.0
    """Sampling temperature (no repetition penalty, on purpose: it would hide over-steering)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    gen_batch_size: int = 48
    """Rows per generate call (rows of different strengths share a batch)."""
    iso_kl: float | None = None
    """Iso-KL calibration: target p95 per-token KL(steered || unsteered current student) in nats; alphas
    and --eval-alpha become multiples of the c* that hits it, re-found each round (None = off)."""
    iso_kl_prompts: int = 8
    """Prompts (greedy completions of --max-new-tokens) per iso-KL evaluation."""
    iso_kl_tol: float = 0.05
    """Iso-KL bisection stops when log(c_hi / c_lo) <= this."""


@dataclass
class FilterConfig:
    tail_frac: float = 0.5
    """Perplexity is scored over this final fraction of the completion (collapse happens mid-way)."""
    ppl_mult: float = 3.0
    """Keep tail-ppl <= ppl_mult x median tail-ppl of the base model's own completions (calibrated per run)."""
    ppl_max: float | None = None
    """Absolute tail-ppl threshold; overrides the calibrated one."""
    rep_max: float = 0.35
    """Max share of the most frequent word/char n-gram (n=2..4)."""
    compress_min: float = 0.30
    """Min zlib compression ratio (compressed/raw bytes); lower = looping soup."""
    distinct_min: float = 0.50
    """Min distinct word-bigram ratio."""
    top_word_max: float = 0.2
    """Max share of the text taken by its most frequent 4+-letter word."""
    narration: bool = True
    """Drop first-person recitals of the persona."""
    refusal: bool = False
    """Drop refusals (off by default: it confounds refusal-shaped traits)."""
    n_keep: int = 48
    """Stop collecting once this many completions are kept."""
    min_train: int = 12
    """Fewer kept than this at the floor dose ends the run (starved)."""
    keep_target: float = 0.5
    """Walk-C accepts a dose multiplier kappa once this fraction of a probe survives."""
    kappa_floor: float = 0.25
    """Smallest dose multiplier walk-C tries before declaring starvation."""
    max_collect_batches: int = 6
    """Upper bound on generate calls per round (probe + collect)."""


@dataclass
class HealConfig:
    reg: Reg = "kl_rev"
    """Barrier divergence: nll (none), kl_rev = KL(student||ref), kl_fwd = KL(ref||student)."""
    lam: float = 0.3
    """Barrier weight lambda."""
    tau: float = 0.5
    """Barrier threshold tau in nats (per aggregation: rmse/p95/max need larger tau than mean)."""
    kl_agg: KlAgg = "rmse"
    """How per-position KL is aggregated over a completion."""
    lam_round_pow: float = 0.0
    """lambda_r = lambda * (1 + round)^p; p < 0 decays the barrier over rounds."""
    barrier_ref: BarrierRef = "base"
    """Reference for the barrier: base = original weights, prev = student before this round."""
    spectral_lam: float = 0.0
    """Weight of the sigma_max(Delta W) penalty on the adapter (0 = off)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA alpha (scale = alpha / r)."""
    lora_layers: tuple[float, float] = (0.2, 0.8)
    """LoRA band as fractions of depth [lo, hi]."""
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Linear module names adapted inside the band."""
    lr: float = 2e-4
    """Peak learning rate."""
    epochs: int = 3
    """Passes over the kept completions."""
    heal_batch_size: int = 8
    """Completions per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    warmup_frac: float = 0.1
    """Fraction of steps spent warming up before the cosine decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    loss_chunk: int = 256
    """Completion positions per LM-head chunk in the heal loss (memory ~ chunk x vocab, not tokens x vocab)."""
    grad_checkpoint: bool = False
    """Recompute decoder blocks in the backward instead of storing their activations (less memory, ~30% slower)."""
    barrier_max_ratio: float = 10.0
    """Safety check: drop a micro-batch's barrier when it exceeds this multiple of its NLL (counted)."""
    max_bad_steps: int = 2
    """Safety check: non-finite micro-batches skipped per round before the run stops (exit 4)."""
    lam_warmup_frac: float = 0.0
    """Ramp lambda linearly from 0 over this fraction of each round's steps (0 = full strength from step 0)."""


@dataclass
class EvalConfig:
    eval_vignettes: str | None = None
    """Vignettes: a tinymfv-schema JSONL path, hf:wassname/tiny-mfv:classic, or None = data/vignettes.jsonl."""
    n_vignettes: int | None = None
    """Use only the first N vignettes (balanced order); None = all."""
    eval_batch_size: int = 32
    """Vignettes per forward pass."""
    eval_think_tokens: int = 0
    """Greedy 'think' tokens before the forced answer slot (0 = answer at once)."""
    eval_alpha: float | None = None
    """Strength for the steered eval; default = median of --alphas x kappa (x c* under --iso-kl)."""


@dataclass
class CollapseConfig:
    pr_contexts: int = 256
    """Neutral prompts (the first of the extraction contexts) for the participation ratio / effective rank."""
    entropy_prompts: int = 16
    """Prompts whose sampled completions measure the student's output entropy (0 = off)."""
    amp_gauge: bool = False
    """Measure the band's amplification (Jacobian sigma_max, torch.func) each round."""
    amp_prompts: int = 4
    """Prompts for the amplification gauge."""
    amp_iters: int = 8
    """Power-iteration steps per prompt for the amplification gauge."""


@dataclass
class RunConfig:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    preset: PresetName = "smol"
    """Named preset the other flags override (fast = tiny random model, smol = embedded SmolLM2, gemma)."""
    model: str = "smollm2"
    """smollm2 (embedded), tiny-random, a Hugging Face hub id, a local model directory, or a .gguf file."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model dtype; auto = float32 on CPU, bfloat16 on CUDA."""
    device: str = "auto"
    """torch device; auto = cuda if available else cpu."""
    trust_remote_code: bool = False
    """Allow a hub model to run its own Python code (off: only the transformers library's code runs)."""
    n_rounds: int = 2
    """Rounds of extract -> generate -> filter -> heal -> bake -> eval."""
    seed: int = 0
    """Seed for data order, sampling and LoRA init."""
    coh_floor: float = 0.5
    """Stop the loop when healed coherence (answer mass) falls below this."""
    out_dir: Path = Path("out")
    """Parent directory; the run directory is created inside it."""
    run_name: str | None = None
    """Run directory name (default: <UTC timestamp>_<model>_<reg>_s<seed>)."""
    resume: Path | None = None
    """Continue the run in this directory after its last completed round."""
    fast_dev_run: bool = False
    """Same as --preset fast."""


def _fast() -> RunConfig:
    c = RunConfig(preset="fast", model="tiny-random", n_rounds=2, coh_floor=0.0)
    c.extract.n_contexts = 16
    c.extract.steer_layers = (0.4, 0.6)
    c.generate.n_prompts = 4
    c.generate.max_new_tokens = 12
    c.generate.gen_batch_size = 16
    c.filter.n_keep = 8
    c.filter.min_train = 2
    c.filter.max_collect_batches = 2
    # A random model's text is noise, so the text filters would starve it; only ppl calibration runs.
    c.filter.rep_max = 1.0
    c.filter.compress_min = 0.0
    c.filter.distinct_min = 0.0
    c.filter.top_word_max = 1.0
    c.filter.ppl_mult = 100.0
    c.heal.epochs = 1
    c.heal.heal_batch_size = 4
    c.eval.n_vignettes = 14
    c.collapse.pr_contexts = 16
    c.collapse.entropy_prompts = 4
    c.collapse.amp_gauge = True
    c.collapse.amp_prompts = 2
    c.collapse.amp_iters = 4
    return c


def _smol() -> RunConfig:
    # Sized for 2 CPU cores: ~6 min per round (see docs/journal.md for the measurements behind it).
    c = RunConfig(preset="smol", model="smollm2")
    c.extract.n_contexts = 128
    c.filter.n_keep = 40
    c.heal.heal_batch_size = 4
    return c


def _gemma() -> RunConfig:
    c = RunConfig(preset="gemma", model="google/gemma-3-4b-it", n_rounds=10, coh_floor=0.8)
    c.generate.n_prompts = 32
    c.generate.max_new_tokens = 256
    c.generate.alphas = (0.5, 1.0, 2.0)
    c.generate.gen_batch_size = 64
    c.filter.ppl_max = 50.0
    c.filter.n_keep = 64
    c.filter.min_train = 16
    c.heal.lam = 0.1
    c.heal.heal_batch_size = 4
    c.heal.grad_accum = 2
    c.heal.grad_checkpoint = True
    c.eval.eval_batch_size = 16
    return c


PRESETS = {"fast": _fast, "smol": _smol, "gemma": _gemma}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def _preset_from_argv(argv: list[str]) -> str:
    """Find the preset name before tyro parses, so that the preset supplies the defaults."""
    name = "smol"
    for i, a in enumerate(argv):
        if a == "--fast-dev-run":
            name = "fast"
        elif a == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
        elif a.startswith("--preset="):
            name = a.split("=", 1)[1]
    return name


def parse_args(argv: list[str] | None = None) -> RunConfig:
    argv = sys.argv[1:] if argv is None else argv
    default = preset(_preset_from_argv(argv))
    cfg = tyro.cli(tyro.conf.OmitArgPrefixes[RunConfig], default=default, args=argv, description=__doc__)
    if cfg.fast_dev_run and cfg.preset != "fast":
        cfg = dataclasses.replace(cfg, preset="fast")
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    """JSON-ready dict of a config (paths as strings, tuples as lists)."""

    def conv(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def from_dict(d: dict, cls=RunConfig):
    """Rebuild a (nested) config dataclass from `to_dict` output (lists -> tuples, strings -> Paths)."""
    import typing

    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, t = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(t):
            v = from_dict(v, t)
        elif isinstance(v, list):
            v = tuple(v)
        elif isinstance(v, str) and Path in typing.get_args(t) or t is Path:
            v = Path(v)
        kw[f.name] = v
    return cls(**kw)

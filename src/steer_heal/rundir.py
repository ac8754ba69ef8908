"""The one place that knows where artifacts live, and how they are written (atomically).

    <out>/<run>/config.json              resolved config, argv, git commit, package versions (first)
    <out>/<run>/events.jsonl             the record of the run (see events.py)
    <out>/<run>/rounds/rNN/vector.safetensors, completions.jsonl, adapter/, eval_<model>.jsonl, DONE
    <out>/<run>/base/eval_base.jsonl     the base model's per-vignette rows
    <out>/<run>/export/                  final student as a Hugging Face model directory
    <out>/<run>/summary.md, trajectory.png

Every file is written to a temporary name and renamed into place, so a file that exists is complete.
A round is complete when its DONE marker exists (written last). `read_state` is the one reader of
what a resume needs (finished rounds, base eval, filter calibration), and checks it is consistent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from steer_heal import events
from steer_heal.config import RESUMABLE
from steer_heal.errors import UserError
from steer_heal.events import finite
from steer_heal.flags import undecodable


def _tmp(path: Path) -> Path:
    """The temporary name a file or directory is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def atomic_write(path: Path, write) -> None:
    """write(tmp), then rename tmp to path (a file or a directory); on any failure the temporary is
    removed and path is untouched. So a path that exists is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    _remove(tmp)
    try:
        write(tmp)
        if path.is_dir():  # a directory cannot be replaced in one step: set the old one aside first
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: Path):
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(finite(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def atomic_write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(finite(r), ensure_ascii=False, allow_nan=False) + "\n" for r in rows))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=meta))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def atomic_dir(target: Path, write) -> None:
    """Call write(tmp_dir), then rename tmp_dir to target (replacing an older one)."""
    atomic_write(target, write)


_TEMP = re.compile(r"^\.(.+)\.(tmp|old)(\d+)$")


# Kernel pseudo-filesystems: what looks like a file or directory there is a view of the kernel, and some
# sandboxes accept writes there that go nowhere, so a run would "finish" and keep nothing.
PSEUDO_FS = (Path("/proc"), Path("/sys"), Path("/dev"))
SHM = Path("/dev/shm")  # under /dev, but real (tmpfs) storage: allowed


def pseudo_fs(real: Path) -> Path | None:
    """The kernel pseudo-filesystem a resolved path lies in (or is), None for storage."""
    under = lambda p: real == p or p in real.parents  # noqa: E731
    return None if under(SHM) else next((p for p in PSEUDO_FS if under(p)), None)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a newline, a tab, an escape ...: no log line shows such a name faithfully


def _name_error(flag: str, text: str, what: str = "") -> str | None:
    if undecodable(text):
        return f"{flag} {text!r}:{what} has bytes that are not UTF-8; choose a UTF-8 path"
    if _CONTROL.search(text):
        return f"{flag} {text!r}:{what} holds a control character; choose a plain path"
    return None


def usable_path(path: Path, flag: str) -> Path:
    """`path` resolved, once: absolute, its symlinks followed. A UserError in one line if its name has bytes that
    are not UTF-8 or a control character (config.json, the log and the events record it as UTF-8 text), or if
    it cannot be resolved (a symlink loop). Checked before anything is created."""
    if err := _name_error(flag, str(path)):
        raise UserError(err)
    try:
        real = Path(path).resolve()
    except (RuntimeError, OSError) as e:  # Python < 3.13 raises RuntimeError on a symlink loop
        raise UserError(f"{flag} {str(path)!r}: cannot be resolved ({e}); is it a symlink loop?") from e
    if err := _name_error(flag, str(real), " resolves to a path that"):  # a symlink, or the current directory
        raise UserError(err)
    return real


def writable_dir(path: Path, flag: str) -> None:
    """Check that `path` is (or can be created as) a directory in which a file written reads back; a UserError
    naming `flag` if not. Leaves the file system as it found it: the directories this call created are
    removed again, so a refusal found later (a bad model, a bad data file) leaves nothing behind."""
    path = Path(path)
    fs = pseudo_fs(usable_path(path, flag))
    if fs is not None:
        raise UserError(f"{flag} {path}: inside {fs}, a kernel pseudo-filesystem, not storage; choose a directory "
                        "on a disk")  # fmt: skip
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; it must be a directory (it is created if missing)")
    missing = [p for p in (path, *path.parents) if not p.exists()]  # deepest first: what mkdir will create
    probe = path / f".write-probe.tmp{os.getpid()}"
    token = os.urandom(8).hex().encode()
    try:
        path.mkdir(parents=True, exist_ok=True)
        try:
            probe.write_bytes(token)
            back = probe.read_bytes()
        finally:
            probe.unlink(missing_ok=True)
        if back != token:
            raise OSError(f"a file written there read back as {len(back)} other bytes")
    except OSError as e:
        remove_empty(missing)
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror or e}); choose a writable directory") from e
    remove_empty(missing)


def remove_empty(dirs: list[Path]) -> None:
    """rmdir each of `dirs` (deepest first) that exists and is empty; stop at the first that is not."""
    for p in dirs:
        try:
            p.rmdir()
        except FileNotFoundError:  # never created (mkdir stopped before it got this deep)
            continue
        except OSError:
            break


def create_run_dir(root: Path) -> list[Path]:
    """mkdir the run directory (and its missing parents); returns what it created, deepest first."""
    created = [p for p in (root, *root.parents) if not p.exists()]
    root.mkdir(parents=True)
    return created


def discard_run_dir(created: list[Path]) -> None:
    """Remove a run directory this process created and the parents it made for it: what a refusal found
    after the directory exists (before any round is complete) does, so that it too leaves nothing behind."""
    if created:
        shutil.rmtree(created[0], ignore_errors=True)
        remove_empty(created[1:])


PACKAGES = ("torch", "transformers", "peft", "safetensors", "accelerate", "tyro", "gguf")


def git_commit() -> str | None:
    """The commit of the code that runs (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    """Python and the key packages' versions, for config.json."""
    out = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "missing"
    return out


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}")


def safe_name(name: str) -> str:
    """A run name is one path component: no separators, no '..', nothing that escapes --out-dir. fullmatch,
    not match + '$', which lets a trailing newline through."""
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
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

    def remove_temps(self) -> int:
        """Clean up after a killed process: delete what it left half-written (`.<name>.tmp<pid>`, e.g. a whole
        model copy from an export), and put back a directory it had set aside to replace (`.<name>.old<pid>`)
        if the replacement never arrived. Returns how many it handled; this process's own are left alone."""
        stale = [(p, m) for p in self.root.rglob(".*") if (m := _TEMP.match(p.name)) and int(m[3]) != os.getpid()]
        for p, m in stale:
            if m[2] == "old" and not (p.parent / m[1]).exists():
                os.replace(p, p.parent / m[1])
            else:
                _remove(p)
        return len(stale)

    def completed_rounds(self) -> list[int]:
        return sorted(int(p.parent.name[1:]) for p in (self.root / "rounds").glob("r*/DONE"))

    def is_run(self) -> bool:
        return self.config.is_file() and self.events.is_file()

    def read_config(self) -> dict:
        """The run's config.json (resolved config, argv, versions); a UserError if it is not a run."""
        if not self.is_run():
            raise UserError(f"{self.root}: not a steer_heal run directory (needs config.json and events.jsonl)")
        try:
            meta = json.loads(self.config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{self.config}: corrupt config file ({e})") from e
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise UserError(f"{self.config}: no 'config' object in it; is this a steer_heal run directory?")
        return meta

    def vectors(self, r: int) -> dict[int, torch.Tensor]:
        """The teacher vector saved in round r, {layer: [H]}."""
        path = self.vector(r)
        if not path.is_file():
            raise UserError(
                f"{self.root}: no teacher vector for round {r} ({path}); rounds done: {self.completed_rounds()}"
            )
        return {int(k): v for k, v in load_tensors(path).items()}


@dataclass
class RunState:
    """What a resumed run continues from."""

    done: list[int]  # completed rounds, always 0..n-1
    base_eval: dict | None
    calibration: dict | None
    base_collapse: dict | None
    last_round: dict | None  # the round record of the last completed round
    null: dict | None  # the random-direction null measured in round 0

    @property
    def start(self) -> int:
        return self.done[-1] + 1 if self.done else 0


def _flat(d: dict) -> dict:
    """A nested config as {field name: value} (field names are unique across sections: flags are flat)."""
    out = {}
    for k, v in d.items():
        out |= _flat(v) if isinstance(v, dict) else {k: v}
    return out


def config_edits(now: dict, started: dict, free: set[str]) -> list[str]:
    """'--seed: 7 (was 0)' for each field outside `free` whose value in `now` differs from `started`."""
    a, b = _flat(now), _flat(started)
    keys = [k for k in sorted(set(a) | set(b)) if k not in free and a.get(k) != b.get(k)]
    return [f"--{k.replace('_', '-')}: {a.get(k)!r} (was {b.get(k)!r})" for k in keys]


def check_config_unchanged(rd: RunDir, recs: list[dict]) -> None:
    """Refuse a config.json edited in an experiment setting since the run started (its `config` record): the
    resume would run on the edited value while the events, summary and ledger still describe the old one."""
    started = events.first(recs, "config")
    if started is None or not isinstance(started.get("config"), dict):
        return  # a run directory from before the config record: nothing to compare with
    # where a run lives and how far it goes may change (RESUMABLE); nothing else may
    edits = config_edits(finite(rd.read_config()["config"]), started["config"], RESUMABLE)
    if edits:
        raise UserError(
            f"{rd.config}: changed since the run started (its config record in events.jsonl) in "
            f"{'; '.join(edits)}; restore it, or start a new run with the new value"
        )


def read_state(rd: RunDir) -> RunState:
    """Finished rounds and the run-level records, from the DONE markers and events.jsonl. Refuses (with
    the reason) a directory whose rounds cannot be continued: a gap in the finished rounds, a DONE marker
    with no round record, a finished round without its adapter, or a config.json edited since the start."""
    recs = events.read(rd.events)
    check_config_unchanged(rd, recs)
    done = rd.completed_rounds()
    if done != list(range(len(done))):
        gap = next(r for r in range(len(done) + 1) if r not in done)
        raise UserError(
            f"{rd.root}: rounds {done} have DONE markers but round {gap} does not; finished rounds must be "
            f"0..n-1 (restore rounds/r{gap:02d}/DONE, or start a new run)"
        )
    recorded = {x["round"]: x for x in events.find(recs, "round")}
    for r in done:
        if r not in recorded:
            raise UserError(f"{rd.done(r)}: round {r} is marked done but events.jsonl has no record of it")
        if not any(rd.adapter(r).rglob("adapter_model.safetensors")):
            raise UserError(f"{rd.adapter(r)}: round {r} is marked done but its adapter is missing")
    return RunState(
        done=done,
        base_eval=events.first(recs, "eval", model="base"),
        calibration=events.first(recs, "calibrate"),
        base_collapse=events.first(recs, "collapse", model="base"),
        last_round=recorded[done[-1]] if done else None,
        null=events.first(recs, "null") if done else None,  # an unfinished round 0 measures it again
    )

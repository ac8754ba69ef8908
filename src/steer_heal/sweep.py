"""Sweeps: a grid of ordinary runs (axes x seeds) on an existing engine, resumable, aggregated with intervals.

    uv run python -m steer_heal.sweep sweeps/fast.toml --out-dir out/sweeps/fast            # a laptop
    uv run python -m steer_heal.sweep sweeps/reg.toml --launcher slurm --partition gpu --dry-run

A spec (TOML) names the flags every cell shares, the axes (any run flag, a list of values each) and the
seeds:

    # H: what the sweep tests
    base = ["--preset", "smol", "--n-rounds", "3"]
    seeds = [0, 1, 2]
    [axes]
    reg = ["nll", "kl_rev"]

Each cell is one run (`python -m steer_heal.run`) with its own run directory DIR/<cell id> and ledger
row in DIR/results.jsonl; DIR/sweep.json records the expansion (cell id -> flags -> run dir) and
DIR/cells/<id>.json each cell's state. Cells run through submitit: `local` runs them on this machine
(--jobs N at a time), `slurm` submits one array job (one GPU per cell by default). Re-running a sweep
skips finished cells, resumes cells whose run stopped mid-way (`--resume` on their run dir), and never
runs a cell twice at once (a lock per cell). A cell that fails records its exit code and the reason and
does not stop the others. At the end (or with --aggregate) every arm's headline figures get n, mean,
sd and a 95 % t-interval (DIR/aggregate.md, aggregate.json, arms.png); failed cells are listed.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from steer_heal import config, ledger
from steer_heal.cli import ArgumentParser, cli, positive_int
from steer_heal.errors import UserError
from steer_heal.rundir import atomic_write_json, atomic_write_text

DONE_CODES = {0: "done", 3: "done (starved)", 4: "done (non-finite heal loss)"}  # a run that ended with a verdict


@dataclass
class Cell:
    id: str
    flags: list[str]  # the run flags of this cell, without --out-dir / --run-name
    arm: dict  # axis -> value
    seed: int


@dataclass
class Spec:
    path: Path
    base: list[str]
    axes: dict[str, list]
    seeds: list[int]
    hypothesis: str

    @classmethod
    def read(cls, path: Path) -> Spec:
        """Parse and check a sweep file: axis names must be run flags; values are checked by each run."""
        try:
            d = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise UserError(f"{path}: no such sweep file") from e
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: not valid TOML ({e})") from e
        known = {name for _, name, _, _ in config.leaves(config.RunConfig())}
        axes = d.get("axes", {})
        reserved = ("seed", *config.WHERE)  # the sweep sets these itself (and a plan or resume is no cell)
        bad = [k for k in axes if k.replace("-", "_") not in known or k.replace("-", "_") in reserved]
        if bad:
            raise UserError(f"{path}: axes {bad} are not run flags a sweep may vary (see --help of steer_heal.run)")
        if not all(isinstance(v, list) and v for v in axes.values()):
            raise UserError(f"{path}: each axis needs a non-empty list of values")
        seeds = d.get("seeds", [0])
        if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)):
            raise UserError(f"{path}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
        base = [str(x) for x in d.get("base", [])]
        hyp = hypothesis(Path(path).read_text(encoding="utf-8"))
        return cls(Path(path), base, {k.replace("-", "_"): v for k, v in axes.items()}, seeds, hyp)

    def cells(self) -> list[Cell]:
        """The grid: every combination of axis values, times every seed (ids unique, or a UserError)."""
        out = []
        names = list(self.axes)
        for values in itertools.product(*(self.axes[k] for k in names)):
            arm = dict(zip(names, values))
            for seed in self.seeds:
                flags = [*self.base]
                for k, v in arm.items():
                    flags += [config.flag(k), *(map(str, v) if isinstance(v, list) else [str(v)])]
                flags += ["--seed", str(seed)]
                out.append(Cell(cell_id(arm, seed), flags, arm, seed))
        ids = [c.id for c in out]
        clash = sorted({i for i in ids if ids.count(i) > 1})
        if clash:
            raise UserError(f"{self.path}: cells {clash} would share a run directory; make the axis values distinct")
        return out


def hypothesis(text: str) -> str:
    """The '# H: ...' comment of a sweep file, with the comment lines that continue it."""
    lines, out = text.splitlines(), []
    for i, ln in enumerate(lines):
        if ln.startswith("# H:"):
            out.append(ln[2:].strip())
            out += [x[1:].strip() for x in itertools.takewhile(lambda x: x.startswith("#"), lines[i + 1 :])]
            break
    return " ".join(out)


def cell_id(arm: dict, seed: int) -> str:
    """A run-name-safe id: reg-kl_rev_lam-0.3_s0."""
    parts = [f"{k}-{v if not isinstance(v, list) else '-'.join(map(str, v))}" for k, v in arm.items()]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "_".join([*parts, f"s{seed}"]))[:180]


# ---------------------------------------------------------------- one cell (runs inside a submitit job)


def state_path(out: Path, cid: str) -> Path:
    return out / "cells" / f"{cid}.json"


def read_state(out: Path, cid: str) -> dict:
    p = state_path(out, cid)
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {"id": cid, "state": "pending", "attempts": 0}


def cell_argv(cell: Cell, out: Path) -> list[str]:
    """A fresh run, or `--resume` of the cell's run directory when a run was started there."""
    run_dir = out / cell.id
    if (run_dir / "config.json").is_file():
        return ["--resume", str(run_dir)]
    return [*cell.flags, "--out-dir", str(out), "--run-name", cell.id]


def run_cell(cell: Cell, out: Path, frontier: bool = False) -> dict:
    """Run one cell under its lock and record its state; a finished cell is skipped, a busy one left alone.
    With `frontier`, steer_heal.frontier_run then measures the cell's frontier (A_steer / A_prompt)."""
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    with open(out / "cells" / f"{cell.id}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_state(out, cell.id) | {"state": "running elsewhere"}
        st = read_state(out, cell.id)
        if st["state"].startswith("done"):
            return st
        argv = cell_argv(cell, out)
        st |= {"state": "running", "attempts": st["attempts"] + 1, "argv": argv, "started": time.time()}
        atomic_write_json(state_path(out, cell.id), st)
        log = out / "cells" / f"{cell.id}.log"
        with log.open("a", encoding="utf-8") as f:
            p = subprocess.run([sys.executable, "-m", "steer_heal.run", *argv], stdout=f, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
            f.write(p.stderr)
        st |= {"code": p.returncode, "ended": time.time(), "reason": reason(p.stderr, out / cell.id)}
        st["state"] = DONE_CODES.get(p.returncode, "failed")
        if frontier and p.returncode == 0 and not (out / cell.id / "frontier.json").is_file():
            with log.open("a", encoding="utf-8") as f:
                q = subprocess.run(
                    [sys.executable, "-m", "steer_heal.frontier_run", str(out / cell.id)], stdout=f, stderr=f
                )
            st["frontier_code"] = q.returncode
        atomic_write_json(state_path(out, cell.id), st)
        return st


def reason(stderr: str, run_dir: Path) -> str | None:
    """Why a run ended: its one-line error, else its verdict line, else the last line it printed."""
    lines = [x for x in stderr.splitlines() if x.strip()]
    err = [x for x in lines if x.startswith(("error:", "interrupted"))]
    if err:
        return err[-1]
    verdict = run_dir / "summary.md"
    if verdict.is_file():
        return verdict.read_text(encoding="utf-8").split("\n\n")[1].strip()
    return lines[-1] if lines else None


# ---------------------------------------------------------------- launchers


def launch_local(cells: list[Cell], out: Path, jobs: int, frontier: bool) -> None:
    """submitit's local executor, at most `jobs` cells at a time."""
    import submitit

    ex = submitit.LocalExecutor(folder=out / "submitit")
    ex.update_parameters(timeout_min=60 * 24 * 7)
    pending, running = list(cells), []
    while pending or running:
        while pending and len(running) < jobs:
            cell = pending.pop(0)
            running.append((cell, ex.submit(run_cell, cell, out, frontier)))
        time.sleep(1)
        for cell, job in [x for x in running if x[1].done()]:
            if job.exception() is not None:  # the job itself died (not the run): say so in the cell's state
                st = read_state(out, cell.id) | {"state": "failed", "reason": f"job error: {job.exception()}"}
                atomic_write_json(state_path(out, cell.id), st)
        running = [x for x in running if not x[1].done()]


def slurm_params(a) -> dict:
    """The per-cell resource request (submitit's slurm parameters)."""
    p = {"timeout_min": a.timeout_min, "gpus_per_node": a.gpus_per_cell, "cpus_per_task": a.cpus_per_cell,
         "mem_gb": a.mem_gb, "slurm_array_parallelism": a.jobs}  # fmt: skip
    if a.partition:
        p["slurm_partition"] = a.partition
    return p


def launch_slurm(cells: list[Cell], out: Path, params: dict, frontier: bool) -> list:
    """One SLURM array job, a cell per task."""
    import submitit

    ex = submitit.AutoExecutor(folder=out / "submitit", cluster="slurm")
    ex.update_parameters(**params)
    return ex.map_array(run_cell, cells, [out] * len(cells), [frontier] * len(cells))


def sbatch_preview(n: int, out: Path, params: dict) -> str:
    """The sbatch file submitit would submit for an array of n cells (no cluster needed)."""
    from submitit.slurm.slurm import _make_sbatch_string

    kw = {"time": params["timeout_min"], "gpus_per_node": params["gpus_per_node"],
          "cpus_per_task": params["cpus_per_task"], "mem": f"{params['mem_gb']}GB",
          "array_parallelism": params["slurm_array_parallelism"],
          "partition": params.get("slurm_partition")}  # fmt: skip
    return _make_sbatch_string(command="python -u -m submitit.core._submit ...", folder=out / "submitit" / "%j",
                               map_count=n, **kw)  # fmt: skip


# ---------------------------------------------------------------- the sweep


def record(spec: Spec, cells: list[Cell], out: Path) -> None:
    """DIR/sweep.json: the spec and its expansion, cell id -> flags -> run dir."""
    atomic_write_json(out / "sweep.json", {
        "spec": str(spec.path), "hypothesis": spec.hypothesis, "base": spec.base, "axes": spec.axes,
        "seeds": spec.seeds, "cells": [asdict(c) | {"run_dir": str(out / c.id)} for c in cells],
    })  # fmt: skip


def aggregate(spec: Spec, cells: list[Cell], out: Path) -> str:
    """Per arm: n, mean, sd and a 95 % t-interval of each headline figure (aggregate.md / .json, arms.png);
    cells that did not finish are listed with their reason, not dropped silently."""
    from steer_heal.figures import arms_png

    rows = ledger.with_frontier(ledger.read(out / "results.jsonl"), out / "results.jsonl")
    ids = {c.id for c in cells}
    rows = [r for r in rows if r.get("run") in ids]  # this sweep's cells only
    states = [read_state(out, c.id) for c in cells]
    unfinished = [s for s in states if not s["state"].startswith("done")]
    agg = ledger.aggregate(rows) if rows else []
    text = f"# {spec.path.name}: {len(rows)} of {len(cells)} cells finished\n\n{spec.hypothesis}\n\n"
    text += ledger.table(rows) if rows else "(no finished cell yet)"
    if unfinished:
        text += "\n\nnot finished:\n" + "\n".join(
            f"- {s['id']}: {s['state']}" + (f" (exit {s['code']}: {s.get('reason')})" if "code" in s else "")
            for s in unfinished
        )
    atomic_write_text(out / "aggregate.md", text + "\n")
    atomic_write_json(out / "aggregate.json", {"arms": agg, "cells": states})
    if agg:
        arms_png(agg, out / "arms.png", spec.path.name)
    return text


def run_sweep(spec: Spec, cells: list[Cell], out: Path, a) -> int:
    """Expand, launch (or preview), aggregate. Exit 1 when a cell failed (the others still ran)."""
    if a.dry_run:
        print(f"{len(cells)} cells of {spec.path} -> {out}")
        for c in cells:
            print(f"  {c.id}: {' '.join(c.flags)}")
        if a.launcher == "slurm":
            print(f"\nSLURM array of {len(cells)} tasks, per cell: {json.dumps(slurm_params(a))}\n")
            print(sbatch_preview(len(cells), out, slurm_params(a)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    record(spec, cells, out)
    if not a.aggregate:
        if a.launcher == "slurm":
            jobs = launch_slurm(cells, out, slurm_params(a), a.frontier)
            later = f"python -m steer_heal.sweep {spec.path} --out-dir {out} --aggregate"
            print(f"submitted array job {jobs[0].job_id.split('_')[0]} ({len(jobs)} cells); aggregate later: {later}")
            return 0
        launch_local(cells, out, a.jobs, a.frontier)
    print(aggregate(spec, cells, out))
    return 1 if any(read_state(out, c.id)["state"] == "failed" for c in cells) else 0


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("spec", type=Path, help="the sweep file (TOML)")
    ap.add_argument("--out-dir", type=Path, help="the sweep directory (default out/sweeps/<spec name>)")
    ap.add_argument("--launcher", choices=["local", "slurm"], default="local")
    ap.add_argument(
        "--jobs", type=positive_int, help="cells at a time (local, default 1) / array parallelism (slurm, all)"
    )
    ap.add_argument("--cells", nargs="+", help="run only these cell ids")
    ap.add_argument("--dry-run", action="store_true", help="print the cells (and the SLURM request) and stop")
    ap.add_argument("--aggregate", action="store_true", help="only (re)write the aggregate of what has finished")
    ap.add_argument("--frontier", action="store_true", help="measure each finished cell's frontier (A_steer, A_prompt)")
    ap.add_argument("--partition", help="SLURM partition")
    ap.add_argument("--gpus-per-cell", type=int, default=1)
    ap.add_argument("--cpus-per-cell", type=positive_int, default=8)
    ap.add_argument("--mem-gb", type=positive_int, default=64)
    ap.add_argument("--timeout-min", type=positive_int, default=24 * 60, help="per cell")
    a = ap.parse_args(argv)
    spec = Spec.read(a.spec)
    out = a.out_dir or Path("out") / "sweeps" / a.spec.stem
    cells = spec.cells()
    a.jobs = a.jobs or (len(cells) if a.launcher == "slurm" else 1)
    if a.cells:
        unknown = sorted(set(a.cells) - {c.id for c in cells})
        if unknown:
            raise UserError(f"--cells {unknown}: not in {a.spec}; its cells are {[c.id for c in cells]}")
        cells = [c for c in cells if c.id in a.cells]
    return run_sweep(spec, cells, out, a)


if __name__ == "__main__":
    # Run from the imported module, so that what submitit pickles (run_cell, Cell) is referred to as
    # steer_heal.sweep.*, which its job processes import, and not as this __main__.
    from steer_heal.sweep import main as _main

    cli(_main)

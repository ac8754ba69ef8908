"""Sweeps: expansion, the SLURM request without a cluster, and real fast cells through submitit's local
executor (resumed without redoing a finished cell; a failing cell reported while the others finish)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from steer_heal import ledger, sweep
from steer_heal.errors import UserError

SPEC = """# H: two arms, two seeds
# (the fast preset: the machinery, not a finding)
base = ["--fast-dev-run", "--n-rounds", "1", "--n-vignettes", "7"]
seeds = [0, 1]
[axes]
reg = ["nll", "kl_rev"]
"""


def _spec(tmp_path, text=SPEC, name="s.toml"):
    p = tmp_path / name
    p.write_text(text)
    return sweep.Spec.read(p)


def test_cells_are_the_axes_times_the_seeds(tmp_path):
    spec = _spec(tmp_path)
    cells = spec.cells()
    assert [c.id for c in cells] == ["reg-nll_s0", "reg-nll_s1", "reg-kl_rev_s0", "reg-kl_rev_s1"]
    assert cells[2].flags[-4:] == ["--reg", "kl_rev", "--seed", "0"] and cells[2].flags[:2] == [
        "--fast-dev-run",
        "--n-rounds",
    ]
    assert spec.hypothesis == "H: two arms, two seeds (the fast preset: the machinery, not a finding)"


def test_a_bad_spec_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"axes \['regularizer'\] are not run flags"):
        _spec(tmp_path, SPEC.replace("reg =", "regularizer ="))
    with pytest.raises(UserError, match="seeds must be a non-empty list"):
        _spec(tmp_path, SPEC.replace("seeds = [0, 1]", "seeds = []"))
    with pytest.raises(UserError, match="not valid TOML"):
        _spec(tmp_path, "axes = [")


def test_a_started_cell_is_resumed(tmp_path):
    cell = _spec(tmp_path).cells()[0]
    assert "--resume" not in sweep.cell_argv(cell, tmp_path)
    (tmp_path / cell.id).mkdir()
    (tmp_path / cell.id / "config.json").write_text("{}")
    assert sweep.cell_argv(cell, tmp_path) == ["--resume", str(tmp_path / cell.id)]


def test_dry_run_for_slurm_prints_the_array_and_the_resources(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC)
    code = sweep.main([str(spec), "--launcher", "slurm", "--dry-run", "--partition", "gpu", "--mem-gb", "32",
                       "--out-dir", str(tmp_path / "out")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "SLURM array of 4 tasks" in out
    for line in ("#SBATCH --array=0-3%4", "#SBATCH --gpus-per-node=1", "#SBATCH --mem=32GB", "#SBATCH --partition=gpu"):
        assert line in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_a_local_sweep_resumes_without_redoing_a_finished_cell(tmp_path):
    spec, out = tmp_path / "s.toml", tmp_path / "out"
    spec.write_text(SPEC)
    # the first cell finishes, then the sweep is stopped (here: it was asked for that cell only)
    assert sweep.main([str(spec), "--out-dir", str(out), "--cells", "reg-nll_s0"]) == 0
    first = json.loads((out / "cells" / "reg-nll_s0.json").read_text())
    events_before = (out / "reg-nll_s0" / "events.jsonl").read_text()
    assert sweep.main([str(spec), "--out-dir", str(out), "--jobs", "2"]) == 0
    assert json.loads((out / "cells" / "reg-nll_s0.json").read_text())["attempts"] == first["attempts"] == 1
    assert (out / "reg-nll_s0" / "events.jsonl").read_text() == events_before  # not run again
    rows = ledger.read(out / "results.jsonl")
    assert sorted(r["run"] for r in rows) == ["reg-kl_rev_s0", "reg-kl_rev_s1", "reg-nll_s0", "reg-nll_s1"]
    md = (out / "aggregate.md").read_text()
    assert "4 of 4 cells finished" in md and "| reg=kl_rev" in md and "| reg=nll" in md
    agg = json.loads((out / "aggregate.json").read_text())["arms"]
    assert [a["runs"] for a in agg] == [2, 2] and all(a["final_dtrait"]["n"] == 2 for a in agg)
    assert (out / "arms.png").stat().st_size > 5_000 and json.loads((out / "sweep.json").read_text())["cells"]


def test_a_failing_cell_is_reported_while_the_others_finish(tmp_path):
    spec, out = tmp_path / "bad.toml", tmp_path / "out"
    spec.write_text(
        SPEC.replace('reg = ["nll", "kl_rev"]', "lam = [0.3, -1.0]").replace("seeds = [0, 1]", "seeds = [0]")
    )
    assert sweep.main([str(spec), "--out-dir", str(out)]) == 1  # one cell failed
    bad = json.loads((out / "cells" / "lam--1.0_s0.json").read_text())
    assert bad["state"] == "failed" and bad["code"] == 2 and "--lam -1.0 must be a finite number >= 0" in bad["reason"]
    good = json.loads((out / "cells" / "lam-0.3_s0.json").read_text())
    assert good["state"] == "done" and good["code"] == 0
    md = (out / "aggregate.md").read_text()
    assert "1 of 2 cells finished" in md and "lam--1.0_s0: failed (exit 2" in md


def test_a_sweep_measures_a_finished_cells_frontier_with_the_package_module(tmp_path, monkeypatch):
    """--frontier runs `python -m steer_heal.frontier_run CELL` on each finished cell: no script path (it once
    ran scripts/diag_frontier.py by path, which only exists in a checkout). The run and the frontier are
    stood in for here; test_scripts runs the module itself from outside the checkout."""
    calls = []

    def fake(argv, **kw):
        calls.append(argv)
        if argv[2] == "steer_heal.run":
            (tmp_path / "out" / "reg-kl_rev_s0").mkdir(parents=True, exist_ok=True)
        return subprocess.CompletedProcess(argv, 0, stderr="")

    monkeypatch.setattr(sweep.subprocess, "run", fake)
    one_cell = SPEC.replace('reg = ["nll", "kl_rev"]', 'reg = ["kl_rev"]').replace("seeds = [0, 1]", "seeds = [0]")
    cell = _spec(tmp_path, one_cell).cells()[0]
    st = sweep.run_cell(cell, tmp_path / "out", frontier=True)
    assert st["state"] == "done" and st["frontier_code"] == 0
    assert calls[1] == [sys.executable, "-m", "steer_heal.frontier_run", str(tmp_path / "out" / "reg-kl_rev_s0")]

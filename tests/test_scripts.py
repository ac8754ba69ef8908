"""The diagnostic scripts on a finished fast run: each reproduces the run's own numbers where it should."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from steer_heal import events


def _script(name, *args, code=0):
    cmd = [sys.executable, f"scripts/{name}", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == code, p.stderr[-2000:]
    return p.stdout


def test_score_completions_script(tmp_path):
    from tests.test_filter import COHERENT, YOUR

    inp = tmp_path / "in.jsonl"
    lines = [{"prompt": "How do I save money?", "completion": COHERENT[0]}, {"prompt": "Hi", "completion": YOUR}]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    flags = ["--fast-dev-run", "--ppl-max", "1e9", "--rep-max", "0.35", "--compress-min", "0.3"]
    out = [json.loads(x) for x in _script("score_completions.py", inp, *flags).splitlines()]
    assert [x["keep"] for x in out] == [True, False]
    assert out[1]["reason"] in ("repetition", "loop") and out[0]["tail_ppl"] > 0


def test_plot_run_rebuilds_the_report_from_events(fast_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fast_run / "a", copy)
    (copy / "trajectory.png").unlink()
    (copy / "summary.md").unlink()
    _script("plot_run.py", copy)
    assert (copy / "trajectory.png").stat().st_size > 10_000
    md = (copy / "summary.md").read_text()
    assert "| healed" in md and "### r00" in md


def test_barrier_sweep_reproduces_the_runs_own_heal(fast_run, tmp_path):
    # Same data, same init seed, same settings as the run (kl_rev, lam 0.3, tau 0.5, rmse), with round 0's
    # adapter re-loaded from its safetensors: the re-healed student must score exactly like the run's.
    out = tmp_path / "bar.json"
    _script("diag_barrier.py", fast_run / "a", "--round", "1", "--regs", "nll", "kl_rev", "--lams", "0.3", "--out", out)
    rows = json.loads(out.read_text())["rows"]
    assert [r["arm"] for r in rows][:2] == ["base", "steered c=2"] and len(rows) == 4
    run_healed = [x for x in events.read(fast_run / "a", "eval") if x["model"] == "healed" and x["round"] == 1][0]
    same = [r for r in rows if r.get("reg") == "kl_rev"][0]
    assert same["auth_nats"] == pytest.approx(run_healed["auth_nats"], abs=1e-5)
    assert same["coherence"] == pytest.approx(run_healed["coherence"], abs=1e-6)


def test_stages_table_reproduces_the_runs_own_evals(fast_run, tmp_path):
    out = tmp_path / "stages.json"
    _script("diag_stages.py", fast_run / "a", "--cs", "1", "--out", out)
    rows = {r["arm"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["base", "steered c=1", "steered c=2 (run)", "healed r0", "healed r1"]
    recs = events.read(fast_run / "a", "eval")
    run_base = next(x for x in recs if x["model"] == "base")
    assert rows["base"]["auth_nats"] == pytest.approx(run_base["auth_nats"], abs=1e-5) and rows["base"]["dTrait"] == 0
    for r in (0, 1):  # adapters re-attached from safetensors score exactly like the run's own healed evals
        run_healed = next(x for x in recs if x["model"] == "healed" and x["round"] == r)
        assert rows[f"healed r{r}"]["auth_nats"] == pytest.approx(run_healed["auth_nats"], abs=1e-5)
    run_steered = next(x for x in recs if x["model"] == "steered" and x["round"] == 0)
    assert rows["steered c=2 (run)"]["auth_nats"] == pytest.approx(run_steered["auth_nats"], abs=1e-5)


def test_prompt_baseline_rows_are_paired(fast_run, tmp_path):
    out = tmp_path / "baseline.json"
    _script("diag_prompt_baseline.py", fast_run / "a", "--n-random", "2", "--n-vignettes", "7", "--out", out)
    d = json.loads(out.read_text())
    rows = {r["arm"]: r for r in d["rows"]}
    assert d["n"] == 7
    assert list(rows) == [
        "base",
        "system prompt",
        "random vector s0",
        "random vector s1",
        "random vector (mean of 2)",
        "steered c=2",
        "healed r0",
        "healed r1",
    ]
    assert rows["base"]["dTrait"] == 0
    steered = rows["steered c=2"]  # retain of steered vs itself is 1 (None when |dTrait| < 0.05 nats)
    assert steered["retain"] == pytest.approx(1.0) if abs(steered["dTrait"]) >= 0.05 else steered["retain"] is None
    mean = (rows["random vector s0"]["auth_nats"] + rows["random vector s1"]["auth_nats"]) / 2
    assert rows["random vector (mean of 2)"]["auth_nats"] == pytest.approx(mean)
    assert rows["system prompt"]["auth_nats"] != rows["base"]["auth_nats"]  # the prompt really changed


def test_random_vector_has_the_teachers_norm_per_layer():
    from scripts.diag_prompt_baseline import random_like

    g = torch.Generator().manual_seed(123)  # not the global RNG: after a manual_seed(0) it would equal seed 0's draw
    v = {3: torch.randn(16, generator=g) * 5, 4: torch.randn(16, generator=g)}
    r = random_like(v, 0)
    for L in v:
        assert float(r[L].norm()) == pytest.approx(float(v[L].norm()), rel=1e-5)
        assert abs(float(torch.nn.functional.cosine_similarity(r[L], v[L], dim=0))) < 0.9
    assert not torch.equal(random_like(v, 1)[3], r[3])


def test_diag_collapse_tables_the_signals(fast_run, tmp_path):
    out = tmp_path / "collapse.json"
    text = _script("diag_collapse.py", fast_run / "a", "--out", out)
    d = json.loads(out.read_text())
    assert [r["round"] for r in d["rows"]] == ["base", 0, 1] and "coherence drop" in text
    assert {r["signal"] for r in d["lead_lag"]} >= {"pr_band", "entropy_mean", "amp"}


def test_results_aggregates_the_ledger(fast_run):
    text = _script("results.py", "--ledger", fast_run / "results.jsonl")
    assert "| fast" in text and "kl_rev" in text

"""End-to-end fast runs, checked through events.jsonl (the oracle), plus the CLI's error contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from steer_heal import events, report
from steer_heal.config import parse_args
from steer_heal.run import run

STAGES = ["extract", "generate", "filter", "eval", "heal", "bake", "eval", "collapse", "round"]


def _fast(tmp_path, name, *extra):
    argv = ["--fast-dev-run", "--n-rounds", "2", "--out-dir", str(tmp_path), "--run-name", name, *extra]
    return argv, parse_args(argv)


def _round_stages(recs, r):
    return [x["stage"] for x in recs if x["round"] == r and x["stage"] in set(STAGES)]


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    argv, cfg = _fast(tmp, "a")
    assert run(cfg, argv) == 0
    return tmp


def test_fast_run_records_every_stage_in_order(fast_run):
    recs = events.read(fast_run / "a")
    assert all({"schema", "ts", "stage", "round"} <= set(x) for x in recs)
    assert recs[0]["stage"] == "config"
    base = [x for x in recs if x["stage"] == "eval" and x["model"] == "base"]
    assert len(base) == 1 and base[0]["round"] == -1
    assert recs.index(base[0]) < min(i for i, x in enumerate(recs) if x["stage"] == "extract")
    for r in (0, 1):
        assert _round_stages(recs, r) == STAGES
        evals = [x["model"] for x in recs if x["stage"] == "eval" and x["round"] == r]
        assert evals == ["steered", "healed"]
    rounds = [x for x in recs if x["stage"] == "round"]
    assert [x["round"] for x in rounds] == [0, 1]
    for x in rounds:
        assert x["n_kept"] > 0 and x["base_trait"] == base[0]["auth_nats"]
        assert x["dtrait_healed"] == pytest.approx(x["healed_trait"] - x["base_trait"])
    assert recs[-1]["stage"] == "summary"


def test_fast_run_artifacts(fast_run):
    root = fast_run / "a"
    cfg = json.loads((root / "config.json").read_text())
    assert {"config", "argv", "git_commit", "versions"} <= set(cfg)
    for r in (0, 1):
        d = root / "rounds" / f"r{r:02d}"
        for f in ("vector.safetensors", "completions.jsonl", "eval_steered.jsonl", "eval_healed.jsonl", "DONE"):
            assert (d / f).is_file(), f
        assert (d / "adapter" / f"r{r:02d}" / "adapter_model.safetensors").is_file()
        rows = [json.loads(x) for x in (d / "completions.jsonl").read_text().splitlines()]
        assert all({"tail_ppl", "rep", "compress", "keep", "reason", "ids", "hit_eos"} <= set(x) for x in rows)
    assert (root / "trajectory.png").stat().st_size > 10_000
    assert "PASS" in (root / "summary.md").read_text() or "NULL" in (root / "summary.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(root / "export") is not None
    for r in (0, 1):
        assert (root / "export" / "adapters" / f"r{r:02d}" / "adapter_model.safetensors").is_file()
    ledger = report.read_ledger(fast_run / "results.jsonl")
    assert ledger[-1]["run"] == "a" and ledger[-1]["n_rounds_done"] == 2


def test_same_seed_same_numbers(fast_run, tmp_path):
    argv, cfg = _fast(tmp_path, "b")
    assert run(cfg, argv) == 0
    keys = ("auth_nats", "care_nats", "p_ans_any", "prefill_nll")

    def nums(root):
        return [[x[k] for k in keys] for x in events.read(root, "eval")]

    assert nums(fast_run / "a") == nums(tmp_path / "b")


def test_nan_stops_the_round_and_resume_finishes(tmp_path):
    argv, cfg = _fast(tmp_path, "c", "--max-bad-steps", "0")
    assert run(cfg, argv, poison=(1, 0)) == 4  # --max-bad-steps 0: the first NaN stops the round
    root = tmp_path / "c"
    recs = events.read(root)
    assert [x["round"] for x in recs if x["stage"] == "round"] == [0]
    stop = [x for x in recs if x["stage"] == "stop"][-1]
    assert "step 0" in stop["reason"] and "nll=" in stop["reason"]
    assert (root / "rounds" / "r00" / "DONE").is_file() and not (root / "rounds" / "r01" / "DONE").exists()
    assert (root / "rounds" / "r00" / "adapter" / "r00" / "adapter_model.safetensors").is_file()
    # resume: continues after round 0, and every round is recorded exactly once
    rargv = ["--resume", str(root)]
    assert run(parse_args(rargv), rargv) == 0
    recs = events.read(root)
    assert [x["round"] for x in recs if x["stage"] == "round"] == [0, 1]
    assert sum(1 for x in recs if x["stage"] == "eval" and x["model"] == "base") == 1
    assert _round_stages(recs, 1) == STAGES


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "steer_heal.run", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--preset", "nope"], "nope"),
        (["--fast-dev-run", "--reg", "l2"], "l2"),
        (["--fast-dev-run", "--kl-agg", "median"], "median"),
        (["--fast-dev-run", "--model", "./no/such/dir"], "./no/such/dir"),
        (["--fast-dev-run", "--max-new-tokens", "0"], "--max-new-tokens 0"),
        (["--fast-dev-run", "--gen-batch-size", "-1"], "--gen-batch-size -1"),
        (["--fast-dev-run", "--steer-layers", "0.5", "1.5"], "(0.5, 1.5)"),
        (["--fast-dev-run", "--persona", "grumpy"], "grumpy"),
        (["--fast-dev-run", "--persona-pos", "someone calm", "--persona-neg", "someone calm"], "identical"),
        (["--fast-dev-run", "--run-name", "../escape"], "../escape"),
    ],
)
def test_bad_input_exits_nonzero_naming_the_value(args, needle, tmp_path):
    p = _cli(*args, "--out-dir", str(tmp_path))
    assert p.returncode == 2, p.stderr[-2000:]
    assert needle in p.stderr
    assert "Traceback" not in p.stderr


def test_bad_files_name_file_and_line(tmp_path):
    bad = tmp_path / "ctx.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    p = _cli("--fast-dev-run", "--contexts-file", str(bad), "--out-dir", str(tmp_path))
    assert p.returncode == 2 and f"{bad}:2" in p.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    p = _cli("--fast-dev-run", "--eval-vignettes", str(empty), "--out-dir", str(tmp_path))
    assert p.returncode == 2 and "empty" in p.stderr


def test_corrupt_model_files_are_named(tmp_path):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    p = _cli("--fast-dev-run", "--model", str(gguf), "--out-dir", str(tmp_path))
    assert p.returncode == 2 and str(gguf) in p.stderr and "Traceback" not in p.stderr
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{not json")
    p = _cli("--fast-dev-run", "--model", str(ckpt), "--out-dir", str(tmp_path))
    assert p.returncode == 2 and str(ckpt) in p.stderr and "Traceback" not in p.stderr


def test_resume_refuses_a_changed_config(fast_run):
    p = _cli("--fast-dev-run", "--resume", str(fast_run / "a"), "--reg", "nll", "--out-dir", str(fast_run))
    assert p.returncode == 2 and "reg" in p.stderr and "'kl_rev'" in p.stderr
    p = _cli("--resume", str(fast_run / "nowhere"))
    assert p.returncode == 2 and "not a steer_heal run directory" in p.stderr


def test_starvation_ends_cleanly_with_the_q0_table(tmp_path, capsys):
    # An absolute perplexity ceiling of 1.0 rejects every completion: the dose controller must walk
    # down to its floor, then stop the run with exit code 3 and leave the run directory readable.
    argv, cfg = _fast(tmp_path, "s", "--ppl-max", "1.0")
    assert run(cfg, argv) == 3
    root = tmp_path / "s"
    recs = events.read(root)
    stop = [x for x in recs if x["stage"] == "stop"]
    assert len(stop) == 1 and stop[0]["code"] == 3 and "only 0 completions kept" in stop[0]["reason"]
    filt = [x for x in recs if x["stage"] == "filter"][-1]
    assert filt["starved"] and filt["n_kept"] == 0 and filt["q0"][0]["kept_frac"] == 0.0
    assert (root / "rounds" / "r00" / "completions.jsonl").is_file()
    assert "FAIL" in (root / "summary.md").read_text()
    assert recs[-1]["stage"] == "summary"


def test_score_completions_script(tmp_path):
    from tests.test_filter import COHERENT, YOUR

    inp = tmp_path / "in.jsonl"
    lines = [{"prompt": "How do I save money?", "completion": COHERENT[0]}, {"prompt": "Hi", "completion": YOUR}]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    p = subprocess.run(
        [
            sys.executable,
            "scripts/score_completions.py",
            str(inp),
            "--fast-dev-run",
            "--ppl-max",
            "1e9",
            "--rep-max",
            "0.35",
            "--compress-min",
            "0.3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = [json.loads(x) for x in p.stdout.splitlines()]
    assert [x["keep"] for x in out] == [True, False]
    assert out[1]["reason"] in ("repetition", "loop") and out[0]["tail_ppl"] > 0


def test_plot_run_rebuilds_the_report_from_events(fast_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fast_run / "a", copy)
    (copy / "trajectory.png").unlink()
    (copy / "summary.md").unlink()
    p = subprocess.run([sys.executable, "scripts/plot_run.py", str(copy)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (copy / "trajectory.png").stat().st_size > 10_000
    md = (copy / "summary.md").read_text()
    assert "| healed" in md and "### r00" in md


def test_ledger_reads_back_after_a_column_is_added(tmp_path):
    from scripts.results import table

    path = tmp_path / "results.jsonl"
    report.append_ledger(path, {"run": "old", "reg": "nll", "seed": 0, "final_dtrait": -0.5})
    report.append_ledger(path, {"run": "new", "reg": "nll", "seed": 1, "final_dtrait": -0.7, "new_col": 3})
    rows = report.read_ledger(path)
    assert [r["run"] for r in rows] == ["old", "new"] and "new_col" not in rows[0]
    md = table(rows, ["reg"])
    assert "-0.600 ± 0.141" in md and "| nll" in md


def test_barrier_sweep_reproduces_the_runs_own_heal(fast_run, tmp_path):
    # Same data, same init seed, same settings as the run (kl_rev, lam 0.3, tau 0.5, rmse), with round 0's
    # adapter re-loaded from its safetensors: the re-healed student must score exactly like the run's.
    out = tmp_path / "bar.json"
    p = subprocess.run(
        [
            sys.executable,
            "scripts/diag_barrier.py",
            str(fast_run / "a"),
            "--round",
            "1",
            "--regs",
            "nll",
            "kl_rev",
            "--lams",
            "0.3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["arm"] for r in rows][:2] == ["base", "steered c=2"] and len(rows) == 4
    run_healed = [x for x in events.read(fast_run / "a", "eval") if x["model"] == "healed" and x["round"] == 1][0]
    same = [r for r in rows if r.get("reg") == "kl_rev"][0]
    assert same["auth_nats"] == pytest.approx(run_healed["auth_nats"], abs=1e-5)
    assert same["coherence"] == pytest.approx(run_healed["coherence"], abs=1e-6)


def _script(name, *args):
    cmd = [sys.executable, f"scripts/{name}", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


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

    v = {3: torch.randn(16) * 5, 4: torch.randn(16)}
    r = random_like(v, 0)
    for L in v:
        assert float(r[L].norm()) == pytest.approx(float(v[L].norm()), rel=1e-5)
        assert abs(float(torch.nn.functional.cosine_similarity(r[L], v[L], dim=0))) < 0.9
    assert not torch.equal(random_like(v, 1)[3], r[3])


def test_collapse_signals_recorded_and_led_by_diag_collapse(fast_run, tmp_path):
    recs = events.read(fast_run / "a", "collapse")
    assert [(x["round"], x["model"]) for x in recs] == [(-1, "base"), (0, "healed"), (1, "healed")]
    for x in recs:
        assert 1 <= x["pr_band"] <= x["n_acts"] - 1 and 1 <= x["pr_final"] <= x["n_acts"] - 1
        assert 0 < x["entropy_p5"] <= x["entropy_mean"] and x["amp"] > 0
    for x in events.read(fast_run / "a", "round"):
        assert x["barrier_skipped"] == 0 and x["steps_skipped"] == 0 and x["pr_band"] is not None
    out = tmp_path / "collapse.json"
    text = _script("diag_collapse.py", fast_run / "a", "--out", out)
    d = json.loads(out.read_text())
    assert [r["round"] for r in d["rows"]] == ["base", 0, 1] and "coherence drop" in text
    assert {r["signal"] for r in d["lead_lag"]} >= {"pr_band", "entropy_mean", "amp"}
    assert "## Collapse signals" in (fast_run / "a" / "summary.md").read_text()

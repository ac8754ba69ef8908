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
    from tests.test_filters import COHERENT, YOUR

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
    run_heal = next(x for x in events.read(fast_run / "a", "heal") if x["round"] == 1)
    assert same["steps"] == run_heal["steps"] and 0 < same["heal_s"] < same["seconds"]  # heal timed apart from eval


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
    from steer_heal.extract import random_like

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
    assert "preset=fast" in text and "reg=kl_rev" in text
    assert "n = 1 < 3 seeds, the interval is not a claim" in text


# ---------------------------------------------------------------- bad input to the scripts: one line, exit 2


def _command(capsys, script: str, *args, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """A script's main in-process through the shared wrapper: (exit code, stdout, stderr)."""
    import importlib
    import io

    from steer_heal.cli import command

    if stdin is not None:  # bytes underneath, as a real stdin has (the script decodes them itself)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8", "surrogateescape"))))
    try:
        code = command(importlib.import_module(f"scripts.{script}").main, [str(a) for a in args])
    except SystemExit as e:  # argparse: --help, or a value its type refuses
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plot_run_help_is_help_not_a_run_directory(capsys):
    code, out, _ = _command(capsys, "plot_run", "--help")
    assert code == 0 and "run_dir" in out


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("diag_kl_agg", ["--positions", "0"], "argument --positions: 0 must be an integer >= 1"),
        ("diag_kl_agg", ["--positions", "10", "--loop", "9"], "need 1 <= --loop <= --positions / 2"),
        ("diag_csweep", ["--cs", "nan", "--fast-dev-run"], "argument --cs: nan must be a finite number >= 0"),
        ("diag_stages", ["/no/such/run"], "/no/such/run: no events.jsonl here"),
        ("diag_prompt_baseline", ["/no/such/run", "--n-random", "0"], "argument --n-random: 0 must be"),
        ("diag_barrier", ["/no/such/run", "--round", "-1"], "argument --round: -1 must be an integer >= 0"),
        ("bench", ["--run-dir", "/no/such/run", "--fast-dev-run"], "/no/such/run: no events.jsonl here"),
        ("results", ["--ledger", "/no/such/results.jsonl"], "no rows in /no/such/results.jsonl"),
        ("diag_null", ["/no/such/run"], "/no/such/run: no events.jsonl here"),
        # run flags go through the run's own validation (Session.from_config), before any model loads
        ("diag_csweep", ["--fast-dev-run", "--n-boot", "5"], "--n-boot 5 must be an integer >= 100 and <= 100000"),
        ("bench", ["--fast-dev-run", "--eval-batch-size", "0"], "--eval-batch-size 0 must be an integer >= 1"),
    ],
)
def test_scripts_refuse_bad_input_in_one_line(capsys, script, args, message):
    code, _, err = _command(capsys, script, *args)
    assert code == 2 and message in err, err
    assert "Traceback" not in err


def test_score_completions_names_the_bad_stdin_line(capsys, monkeypatch):
    code, _, err = _command(capsys, "score_completions", "-", "--fast-dev-run", stdin='{"prompt": "a"}\n{oops\n',
                            monkeypatch=monkeypatch)  # fmt: skip
    assert code == 2 and "stdin:1: missing field 'completion' (each record needs ['prompt', 'completion'])" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ppl-max", "nan"], "--ppl-max nan must be a finite number"),  # NaN turned the perplexity filter off
        (["--n-prompts", "-3"], "--n-prompts -3 must be an integer >= 1"),
    ],
)
def test_score_completions_validates_run_flags_as_the_run_does(capsys, monkeypatch, flags, message):
    stdin = json.dumps({"prompt": "Hi", "completion": "Hello there."}) + "\n"
    code, out, err = _command(capsys, "score_completions", "-", "--fast-dev-run", *flags, stdin=stdin,
                              monkeypatch=monkeypatch)  # fmt: skip
    assert code == 2 and err.strip() == f"error: {message}" and not out


def _ledger(tmp_path, *runs) -> str:
    from steer_heal import ledger

    path = tmp_path / "results.jsonl"
    for name, seed, x in runs:
        ledger.append(path, {"run": name, "seed": seed, "final_dtrait": x, "config": {"preset": "smol"}})
    return path


def test_results_refuses_reruns_of_one_seed_as_seeds(capsys, tmp_path):
    code, _, err = _command(
        capsys, "results", "--ledger", _ledger(tmp_path, ("a", 0, -0.5), ("b", 0, -0.5), ("c", 1, 0))
    )
    assert code == 2 and "runs a, b all have seed 0; an interval across seeds needs one run per seed" in err
    code, out, _ = _command(capsys, "results", "--ledger", _ledger(tmp_path / "ok", ("a", 0, -0.5), ("c", 1, -0.7)))
    assert code == 0 and "-0.600 ± 0.141" in out


def test_diag_scripts_on_a_run_with_no_finished_round(capsys, tmp_path):
    from steer_heal.config import parse_args
    from steer_heal.run import run
    from tests.conftest import fast_args

    argv = fast_args(tmp_path, "starved", "--ppl-max", "1.0", rounds=1)
    assert run(parse_args(argv), argv) == 3  # starved in round 0: no eval, no finished round
    root = tmp_path / "starved"
    code, _, err = _command(capsys, "diag_barrier", root)
    assert code == 2 and "no base and steered eval for round 0" in err
    code, _, err = _command(capsys, "diag_stages", root)
    assert code == 2 and "no completed round to score" in err and not err.startswith("error: --resume")


def test_results_reads_a_torn_ledger(capsys, tmp_path):
    from steer_heal import ledger

    path = tmp_path / "results.jsonl"
    ledger.append(path, {"run": "a", "preset": "smol", "reg": "nll", "seed": 0, "final_dtrait": -0.5})
    with path.open("a") as f:
        f.write('{"run": "b", "pre')  # a crash mid-append
    ledger.append(path, {"run": "c", "preset": "smol", "reg": "nll", "seed": 1, "final_dtrait": -0.7})
    code, out, _ = _command(capsys, "results", "--ledger", path)
    assert code == 0 and "-0.600 ± 0.141" in out


def test_frontier_on_a_fast_run(fast_run, tmp_path):
    import time

    out = tmp_path / "frontier.json"
    t0 = time.time()
    text = _script("diag_frontier.py", fast_run / "a", "--n-null", "3", "--out", out)
    seconds = time.time() - t0
    d = json.loads(out.read_text())
    kinds = [r["kind"] for r in d["rows"]]
    assert kinds.count("base") == 1 and kinds.count("steer") == 7 and kinds.count("random") == 3
    assert kinds.count("prompt") == 5 and kinds.count("healed") == 2  # the persona's 5-step ladder, 2 rounds
    for r in d["rows"]:
        for k in ("dTrait", "dCoh", "dTrait_cal", "dTrait_disc", "separation"):
            assert r[f"{k}_lo"] <= r[k] <= r[f"{k}_hi"], (r["arm"], k)
        # the null is measured on the run's 7-vignette subset (one per foundation), every other arm on all 14
        assert len(r["per_vignette"]) == r["n_vignettes"] == (7 if r["kind"] == "random" else d["n"])
        assert set(r["foundations"]) >= {"Authority", "Care"}
    base = next(r for r in d["rows"] if r["kind"] == "base")
    for k in ("dTrait", "dTrait_cal", "dTrait_disc"):
        assert base[k] == 0 and base[f"{k}_lo"] == base[f"{k}_hi"] == 0  # base against itself
    for r in d["rows"]:  # disc is the change of the arm's own separation from base's (on the arm's vignettes)
        if r["kind"] != "random":
            assert r["dTrait_disc"] == pytest.approx(r["separation"] - base["separation"], abs=1e-9), r["arm"]
    assert [a["round"] for a in d["advantage"]] == [0, 1] and set(d["advantage_by_axis"]) == {"coherence", "ref_nll"}
    assert (
        set(d["advantage_by_trait"]) == {"raw", "cal", "disc"}
        and d["advantage_by_trait"]["raw"] == d["advantage_by_axis"]
    )
    for kind in ("raw", "cal", "disc"):
        for a in d["advantage_by_trait"][kind]["coherence"]:
            for k in ("steer", "prompt"):
                assert a[k]["lo"] <= a[k]["est"] <= a[k]["hi"]
    assert "at matched coherence: A_steer" in text and "of discriminative auth_nats" in text
    assert out.with_suffix(".png").stat().st_size > 10_000
    print(f"diag_frontier on the fast run: {seconds:.0f} s")
    # --arms-from: another heal of the same vector reuses these arms; here the run itself, so all numbers agree
    arms, again = tmp_path / "frontier_arms.jsonl", tmp_path / "again.json"
    _script("diag_frontier.py", fast_run / "a", "--arms-from", arms, "--out", again)
    d2 = json.loads(again.read_text())
    assert [r["arm"] for r in d2["rows"]] == [r["arm"] for r in d["rows"]] and d2["cs"] == d["cs"]
    assert [r["dTrait"] for r in d2["rows"]] == pytest.approx([r["dTrait"] for r in d["rows"]], abs=1e-9)
    assert d2["advantage_by_axis"] == d["advantage_by_axis"]
    lines = arms.read_text().splitlines()
    head = json.loads(lines[0])
    head["key"]["vector"] = "0" * 64  # a different teacher vector: its arms are not this run's
    arms.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    # the package module, from outside the checkout (a sweep runs it this way)
    p = subprocess.run([sys.executable, "-m", "steer_heal.frontier_run", fast_run / "a", "--arms-from", arms],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert p.returncode == 2 and "another vector" in p.stderr and "Traceback" not in p.stderr
    # --n-null 2: the run's own null (2 directions, rows saved) is reused, not measured again
    _script("diag_frontier.py", fast_run / "a", "--n-null", "2", "--cs", "0", "1", "--out", out)
    null = events.read(fast_run / "a", "null")[0]
    rows = [r for r in json.loads(out.read_text())["rows"] if r["kind"] == "random"]
    assert [r["seed"] for r in rows] == null["seeds"]
    assert [r["dTrait"] for r in rows] == pytest.approx(null["dtrait"], abs=1e-6)  # from the saved rows


def test_results_reads_the_frontier_advantages(fast_run, tmp_path):
    import shutil

    from steer_heal import ledger

    shutil.copytree(fast_run / "a", tmp_path / "a")
    adv = [{"round": 0, "steer": {"est": 0.5}}, {"round": 1, "steer": {"est": 0.1}, "prompt": None}]
    (tmp_path / "a" / "frontier.json").write_text(json.dumps({"x": "coherence", "advantage": adv}))
    ledger.append(tmp_path / "results.jsonl", ledger.read(fast_run / "results.jsonl")[0])
    rows = ledger.with_frontier(ledger.read(tmp_path / "results.jsonl"), tmp_path / "results.jsonl")
    assert rows[0]["A_steer"] == 0.1 and rows[0]["A_prompt"] is None and "A_steer_disc" not in rows[0]
    disc = [{"round": 1, "steer": {"est": -0.2}, "prompt": {"est": 0.05}}]
    doc = {"x": "ref_nll", "advantage_by_trait": {"raw": {"coherence": adv}, "disc": {"coherence": disc}}}
    (tmp_path / "a" / "frontier.json").write_text(json.dumps(doc))
    rows = ledger.with_frontier(ledger.read(tmp_path / "results.jsonl"), tmp_path / "results.jsonl")
    assert rows[0]["A_steer"] == 0.1 and rows[0]["A_steer_disc"] == -0.2 and rows[0]["A_prompt_disc"] == 0.05


def test_frontier_seeds_tables_arms_and_advantages_across_runs(capsys, tmp_path):
    """Two synthetic frontiers: each arm's shifts and each round's advantages become mean and t-interval."""

    def doc(name, shift, adv):
        rows = [{"arm": "base", "kind": "base", "dTrait": 0.0, "dTrait_cal": 0.0, "dTrait_disc": 0.0, "dCoh": 0.0},
                {"arm": "healed r0", "kind": "healed", "dTrait": shift, "dTrait_cal": shift / 2, "dTrait_disc": 0.0,
                 "dCoh": -0.1}]  # fmt: skip
        rows += [{"arm": f"random {i}", "kind": "random", "dTrait": x, "dTrait_cal": x, "dTrait_disc": x / 10,
                  "n_vignettes": 35} for i, x in enumerate((-0.3, 0.1, 0.4))]  # fmt: skip
        a = [{"round": 0, "steer": {"est": adv}, "prompt": None}]
        by = {k: {"coherence": a, "ref_nll": a} for k in ("raw", "cal", "disc")}
        return {"run": name, "seed": int(name[1:]), "trait_key": "auth_nats", "n": 140, "rows": rows,
                "advantage_by_trait": by}  # fmt: skip

    for name, shift, adv in (("s0", -0.5, 0.1), ("s1", -0.7, 0.3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "frontier.json").write_text(json.dumps(doc(name, shift, adv)))
    code, out, err = _command(capsys, "frontier_seeds", tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "f.json")
    assert code == 0, err
    res = json.loads((tmp_path / "f.json").read_text())
    healed = next(x for x in res["arms"] if x["arm"] == "healed r0")
    assert healed["n"] == 2 and healed["dTrait"]["mean"] == pytest.approx(-0.6)
    assert healed["dTrait_cal"]["mean"] == pytest.approx(-0.3) and healed["dTrait_disc"]["mean"] == 0.0
    assert res["advantage"][0]["A_steer"]["mean"] == pytest.approx(0.2) and res["advantage"][0]["A_prompt"]["n"] == 0
    assert res["null"][0]["directions"] == 3 and "n = 2 < 3 runs" in out
    code, _, err = _command(capsys, "frontier_seeds", tmp_path / "nope")
    assert code == 2 and "no frontier.json" in err
    # one run given three times is not three seeds (it gave a zero-width interval over n = 3)
    code, _, err = _command(capsys, "frontier_seeds", *[tmp_path / "s0"] * 3)
    assert code == 2 and f"{tmp_path / 's0'} is given more than once" in err
    (tmp_path / "s0b").mkdir()  # another run of seed 0, e.g. a rerun
    (tmp_path / "s0b" / "frontier.json").write_text(json.dumps(doc("s0", -0.5, 0.1)))
    code, _, err = _command(capsys, "frontier_seeds", tmp_path / "s0", tmp_path / "s0b", tmp_path / "s1")
    assert code == 2 and f"runs {tmp_path / 's0'}, {tmp_path / 's0b'} all have seed 0" in err


def test_null_check_reproduces_the_runs_null_and_scores_it_on_every_vignette(fast_run, tmp_path):
    out = tmp_path / "null_check.json"
    text = _script("diag_null.py", fast_run / "a", "--out", out)
    d = json.loads(out.read_text())
    assert d["n_directions"] == 2 and d["n_subset"] == 7 and d["n_full"] == 14
    null = events.read(fast_run / "a", "null")[0]
    for kind in ("raw", "cal", "disc"):
        k = d["kinds"][kind]
        key = {"raw": "dtrait", "cal": "dtrait_cal", "disc": "dtrait_disc"}[kind]
        assert k["per_direction"]["subset"] == pytest.approx(null[key], abs=1e-4)  # the run's own null, re-scored
        assert len(k["per_direction"]["full"]) == 2 and k["subset"]["lo"] <= k["subset"]["hi"]
    assert {(h["round"], h["trait"]) for h in d["healed"]} == {(r, k) for r in (0, 1) for k in ("raw", "cal", "disc")}
    assert all(0 <= h["beats, full vs full null"] <= 1 for h in d["healed"])
    assert "seconds per direction" in text and d["seconds_per_direction"]["full"] > 0


def test_screen_doses_are_relative_to_the_residual_norm():
    from scripts.diag_screen import at_dose

    v = {2: torch.tensor([3.0, 4.0]), 5: torch.tensor([0.0, -2.0])}
    out = at_dose(v, {2: 100.0, 5: 10.0}, 0.03)
    assert float(out[2].norm()) == pytest.approx(3.0) and float(out[5].norm()) == pytest.approx(0.3)
    assert torch.allclose(out[2] / out[2].norm(), v[2] / v[2].norm())  # the direction is kept


def test_diag_screen_scores_each_pair_and_one_null_eval_per_band(tmp_path):
    out = tmp_path / "screen.json"
    _script("diag_screen.py", "--fast-dev-run", "--personas", "care_vs_authority", "warm_vs_cold",
            "--bands", "0.3,0.4", "0.6,0.7", "--doses", "0", "0.5", "--out", out)  # fmt: skip
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 2 * 2 * 2 + 2 * 2 * 2  # (pairs x doses) persona rows + (doses x pairs) null rows, per band
    zero = [r for r in recs if r["r"] == 0]
    assert all(r["dTrait"]["est"] == 0 and r["dCoh"]["est"] == 0 for r in zero)  # r = 0 is the identity
    nulls = [r for r in recs if r["kind"] == "null0" and r["r"] == 0.5]
    for b in ([0.3, 0.4], [0.6, 0.7]):  # one direction per band, read for both pairs' traits
        assert len({r["coherence"] for r in nulls if r["band"] == b}) == 1
    assert {r["trait"] for r in nulls} == {"Authority", "Care"}

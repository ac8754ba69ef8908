"""Reports, verdicts and the ledger on synthetic events files (no model)."""

from __future__ import annotations

import math

import pytest

from steer_heal import events, ledger, report
from steer_heal.records import RoundRecord, RunInfo, deltas, eval_part, run_verdict, slope


def _run(tmp_path, rounds, base=(-5.0, 0.7), stop=None, floor=0.5, half_width=0.02, null=(0.2, -0.1, 0.3, 0.0),
         disc="same", null_disc=(0.05, -0.05, 0.1, 0.0), cal="same", sep=None):  # fmt: skip
    """A run directory whose events hold a config, a base eval, a random null and one round record per
    (trait, coherence), its healed shift with a +-half_width interval, and its discriminative and calibrated
    shifts `disc`, `cal` ("same" = the raw shift, None = not measured) with +-0.05 intervals, and the base
    model's separation `sep` = (est, lo, hi) when given."""
    root = tmp_path / "run"
    root.mkdir()
    ev = events.Events(root / "events.jsonl")
    ev.emit("config", -1, config={"preset": "smol", "heal": {"reg": "kl_rev"}, "seed": 0}, trait_key="auth_nats",
            trait_sign=-1, coh_floor=floor)  # fmt: skip
    b = {"auth_nats": base[0], "coherence": base[1]}
    ev.emit("eval", -1, model="base", **b)
    if null is not None:
        ev.emit("null", 0, c=2.0, dtrait=list(null), dtrait_disc=list(null_disc or []))
    for r, (trait, coh) in enumerate(rounds):
        steered = {"auth_nats": trait - 1.0, "coherence": coh - 0.2}
        d = trait - base[0]
        dd = d if disc == "same" else disc
        dc = d if cal == "same" else cal
        ci = {"dtrait_healed": [d - half_width, d + half_width]}
        if dd is not None:
            ci["dtrait_disc_healed"] = [dd - 0.05, dd + 0.05]
        if dc is not None:
            ci["dtrait_cal_healed"] = [dc - 0.05, dc + 0.05]
        extra = {}
        if sep is not None:
            extra["separation_base"], ci["separation_base"] = sep[0], list(sep[1:])
        evals = eval_part(b, steered, {"auth_nats": trait, "coherence": coh}, "auth_nats")
        rec = RoundRecord.compose(r, evals, {"kappa": 1.0, "ci": ci, "dtrait_disc_healed": dd, "dtrait_cal_healed": dc},
                                  extra)  # fmt: skip
        ev.emit("round", r, **rec.fields())
    if stop:
        ev.emit("stop", len(rounds), reason=stop, code=3)
    return root


def test_deltas_retain_and_slope():
    base, steered, healed = {"t": -5.0, "coherence": 0.7}, {"t": -7.0, "coherence": 0.4}, {"t": -5.5, "coherence": 0.65}
    d = deltas(base, steered, healed, "t")
    assert d["dtrait_steered"] == -2.0 and d["dtrait_healed"] == -0.5
    assert d["retain"] == pytest.approx(0.25) and d["slope_healed"] == pytest.approx(10.0)
    assert slope(0.01, -0.3) is None  # |dTrait| < 0.05 nats: no slope
    assert deltas(base, {"t": -5.01, "coherence": 0.7}, healed, "t")["retain"] is None


@pytest.mark.parametrize(
    "rounds, kw, starts",
    [
        ([(-5.5, 0.65)], {}, "PASS: auth_nats -0.500 [-0.520, -0.480] nats vs base"),
        # the answer word's prior moved, not the judgement: never a PASS
        ([(-5.5, 0.65)], {"disc": 0.01}, "PRIOR ONLY: auth_nats -0.500 [-0.520, -0.480] nats vs base"),
        ([(-5.5, 0.65)], {"disc": 0.3}, "PRIOR ONLY"),  # the judgement moved the wrong way
        ([(-5.5, 0.65)], {"disc": -0.1, "null_disc": (0.0, -0.2, 0.1)}, "INCONCLUSIVE"),  # inside the disc null
        ([(-5.5, 0.65)], {"disc": -0.1, "null_disc": None}, "PASS"),  # no disc null recorded: 0 is the bar
        ([(-5.5, 0.65)], {"disc": None}, "INCONCLUSIVE"),  # no discriminative shift measured: no claim
        ([(-5.5, 0.65)], {"cal": 0.2}, "INCONCLUSIVE"),  # the judgement moved, the calibrated trait the other way
        ([(-5.5, 0.65)], {"cal": None}, "INCONCLUSIVE"),  # no calibrated shift measured
        ([(-5.02, 0.69)], {}, "INCONCLUSIVE"),  # the interval includes 0
        ([(-4.5, 0.69)], {}, "INCONCLUSIVE"),  # moved the wrong way
        ([(-5.08, 0.69)], {}, "INCONCLUSIVE"),  # beyond 0, but inside the null's 95% range (down to -0.09)
        (
            [(-5.08, 0.69)],
            {"disc": 0.02, "cal": None},
            "INCONCLUSIVE: auth_nats -0.080 nats vs base (expected sign -1), coherence 0.690; its 95% interval "
            "[-0.100, -0.060] overlaps the random null's 95% range [-0.092, +0.292] (4 directions); discriminative "
            "+0.020 [-0.030, +0.070] (includes 0 or the wrong way: no sign that the judgement moved)",
        ),  # inside the null, and the discriminative shift says why it is no claim either
        (
            [(-5.5, 0.65)],
            {"null": None},
            "INCONCLUSIVE: auth_nats -0.500 nats vs base (expected sign -1), "
            "coherence 0.650; its 95% interval [-0.520, -0.480] excludes 0, but no random null",
        ),  # no null: no claim
        ([(-5.5, 0.65)], {"half_width": 0.6}, "INCONCLUSIVE"),  # the interval is too wide to exclude 0
        ([(-6.5, 0.3)], {}, "FAIL: coherence 0.300 below the floor"),
        ([(-math.inf, 0.6)], {}, "FAIL: non-finite metrics"),  # a collapsed trait is not a success
        ([], {"stop": "starved at round 0"}, "FAIL: no healed round finished (starved at round 0)"),
    ],
)
def test_verdict_from_events(tmp_path, rounds, kw, starts):
    info = RunInfo.read(_run(tmp_path, rounds, **kw))
    assert run_verdict(info).startswith(starts), run_verdict(info)


@pytest.mark.parametrize(
    "disc, why",
    [
        (0.01, "includes 0: the answer word's prior moved on every vignette alike"),
        (0.3, "points the wrong way: the judgement of the target's violations moved against the persona"),
    ],
)
def test_prior_only_says_whether_the_judgement_stood_still_or_went_the_wrong_way(tmp_path, disc, why):
    v = run_verdict(RunInfo.read(_run(tmp_path, [(-5.5, 0.65)], disc=disc)))
    assert v.startswith("PRIOR ONLY") and why in v, v


def test_report_builds_tables_and_figure(tmp_path):
    root = _run(tmp_path, [(-5.5, 0.65), (-6.0, 0.6)])
    rep = report.build(root)
    assert rep.verdict.startswith("PASS: auth_nats -1.000")
    judged = "; calibrated -1.000 [-1.050, -0.950]; discriminative -1.000 [-1.050, -0.950] excludes 0, beyond"
    assert judged in rep.verdict
    assert "-1.000 [-1.020, -0.980]" in rep.table  # the interval printed next to the estimate
    rows = report.summary_rows(rep.info)
    assert [(r["round"], r["model"]) for r in rows] == [("base", "base"), (0, "steered"), (0, "healed"),
                                                         (1, "steered"), (1, "healed")]  # fmt: skip
    assert rows[2]["dTrait [95% CI]"].startswith("-0.500") and rows[2]["retain"] == "0.33"
    assert (root / "trajectory.png").stat().st_size > 10_000 and "| healed" in (root / "summary.md").read_text()


@pytest.mark.parametrize(
    "sep, says",
    [
        ((0.079, -0.068, 0.222), "+0.079 [-0.068, +0.222] nats; its interval includes 0"),  # no judgement to move
        ((0.9, 0.6, 1.2), "+0.900 [+0.600, +1.200] nats"),  # the eval tells the target's violations apart
    ],
)
def test_summary_names_the_eval_s_item_discrimination_on_the_base_model(tmp_path, sep, says):
    rep = report.build(_run(tmp_path, [(-5.5, 0.65)], sep=sep))
    assert "calibrated log-odds of Authority on the Authority-labelled vignettes minus the rest" in rep.instrument
    assert says in rep.instrument and ("includes 0" in rep.instrument) == (sep[1] <= 0)
    assert f"Instrument: {rep.instrument}." in (tmp_path / "run" / "summary.md").read_text()
    (tmp_path / "x").mkdir()
    assert report.build(_run(tmp_path / "x", [(-5.5, 0.65)])).instrument is None  # not recorded: no line


def test_round_record_round_trips_through_an_event(tmp_path):
    info = RunInfo.read(_run(tmp_path, [(-5.5, 0.65)]))
    (r,) = info.rounds
    assert r.round == 0 and r["healed_trait"] == -5.5 and r["dtrait_healed"] == -0.5 and r["kappa"] == 1.0
    assert r.get("amp") is None and r.get("seconds") is None  # not recorded: reads None
    assert r.fields() == {k: v for k, v in events.read(tmp_path / "run", "round")[0].items()
                          if k not in ("schema", "ts", "stage", "round")}  # fmt: skip


def test_a_round_record_refuses_a_name_two_stages_claim():
    with pytest.raises(ValueError, match="round record: kappa claimed by two stages"):
        RoundRecord.compose(0, {"kappa": 1.0, "n_kept": 3}, {"kappa": 0.5})


def test_a_recorded_field_reaches_the_round_record_under_its_record_name():
    """One field on a stage's result is all a new round metric needs (records.recorded)."""
    from steer_heal.heal import HealResult
    from steer_heal.records import record_part

    res = HealResult("a", 10, 3.0, 2.5, 0.1, 0.2, None, 1.0, barrier_skipped=1, steps_skipped=2)
    want = {"heal_nll_first": 3.0, "heal_nll": 2.5, "heal_d": 0.1, "barrier_fired": 0.2, "barrier_skipped": 1,
            "steps_skipped": 2}  # fmt: skip
    assert record_part(res) == want


def test_ledger_reads_back_after_a_column_is_added(tmp_path):
    path = tmp_path / "results.jsonl"
    ledger.append(path, {"run": "old", "reg": "nll", "seed": 0, "final_dtrait": -0.5})
    ledger.append(path, {"run": "new", "reg": "nll", "seed": 1, "final_dtrait": -0.7, "new_col": 3})
    rows = ledger.read(path)
    assert [r["run"] for r in rows] == ["old", "new"] and "new_col" not in rows[0]
    md = ledger.table(rows, ["reg"])
    assert "-0.600 ± 0.141" in md and "| nll" in md


def test_ledger_survives_a_torn_row_and_counts_a_resumed_run_once(tmp_path):
    path = tmp_path / "results.jsonl"
    ledger.append(path, {"run": "a", "final_dtrait": -0.5})
    with path.open("a") as f:
        f.write('{"run": "b", "final_dt')  # a crash mid-append
    ledger.append(path, {"run": "c", "final_dtrait": -0.2})
    ledger.append(path, {"run": "a", "final_dtrait": -0.9})  # run a resumed and finished again
    rows = ledger.read(path)
    assert [(r["run"], r["final_dtrait"]) for r in rows] == [("a", -0.9), ("c", -0.2)]

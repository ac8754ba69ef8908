"""End-to-end fast runs, checked through events.jsonl (the oracle): every stage in order, the artifacts,
same-seed reproduction, a NaN heal stopping the run and a resume finishing it, and starvation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from steer_heal import events, ledger, models, seeds
from steer_heal.config import parse_args
from steer_heal.records import RunInfo, run_verdict
from steer_heal.run import run
from steer_heal.student import Student
from steer_heal.tokens import chat_ids
from tests.conftest import fast_args, inject

STAGES = ["extract", "generate", "filter", "eval", "heal", "bake", "eval", "collapse", "round"]


def _round_stages(recs, r):
    return [x["stage"] for x in recs if x["round"] == r and x["stage"] in set(STAGES)]


def _run(argv):
    return run(parse_args(argv), argv)


def _export_is_the_baked_student(root):
    """The exported plain model gives the logits of the original model with every round's adapter applied (the
    tiny model is rebuilt from its seed), and they differ from the original's: the heal is in the weights."""
    base, tok = models.load(models.TINY, seed=seeds.derive(0, "global"))  # the fast run's seed 0
    ids = torch.tensor([chat_ids(tok, "Is it fair to break a promise?")])
    with torch.no_grad():
        original = base(ids).logits
        st = Student(base)
        for r in (0, 1):
            st.load_adapter(r, root / "rounds" / f"r{r:02d}" / "adapter")
        applied = st.model(ids).logits
        exported = AutoModelForCausalLM.from_pretrained(root / "export")(ids).logits
    assert torch.allclose(exported, applied, atol=1e-5) and not torch.allclose(exported, original, atol=1e-5)


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
        assert {"extract", "generate", "filter", "eval_steered", "heal", "bake", "eval_healed"} <= set(x["seconds"])
    assert recs[-1]["stage"] == "summary"


def test_fast_run_records_intervals_the_null_and_the_capability_tax(fast_run):
    recs = events.read(fast_run / "a")
    (null,) = [x for x in recs if x["stage"] == "null"]
    assert null["round"] == 0 and len(null["seeds"]) == 2 and null["c"] > 0  # fast preset: 2 directions
    base_rows = [json.loads(x) for x in (fast_run / "a" / "base" / "eval_base.jsonl").read_text().splitlines()]
    labels = {r["id"]: r["label"] for r in base_rows}
    # the null's subset: 7 of the 14 vignettes, one per foundation, in the run's order
    assert null["n_vignettes"] == 7 and sorted(labels[i] for i in null["vignette_ids"]) == sorted(set(labels.values()))
    assert null["vignette_ids"] == [r["id"] for r in base_rows if r["id"] in null["vignette_ids"]]
    for key in ("dtrait", "dtrait_cal", "dtrait_disc"):
        assert len(null[key]) == 2 and all(math.isfinite(v) for v in null[key])
    for kind in ("raw", "cal", "disc"):
        r = null["range"][kind]
        assert r["lo"] <= r["hi"] and r["n"] == 2
    assert len([json.loads(x) for x in (fast_run / "a" / "rounds" / "r00" / "eval_null1.jsonl").open()]) == 7
    for x in events.find(recs, "eval"):
        assert x["ref_nll"] > 0 and len(x["ref_items"]) == 8
        assert math.isfinite(x["auth_nats_cal"]) and len(x["prior_logp"]) == 3  # the three content-free inputs
    for x in events.find(recs, "round"):
        for k in ("dtrait_steered", "dtrait_healed", "dcoh_healed", "dtrait_cal_healed", "dtrait_disc_healed",
                  "dtrait_disc_steered", "separation_base"):  # fmt: skip
            lo, hi = x["ci"][k]
            assert lo <= x[k] <= hi, (k, lo, x[k], hi)
        assert x["dtrait_cal_healed"] == pytest.approx(x["healed_trait_cal"] - x["base_trait_cal"], abs=1e-6)
        assert 0 <= x["null_pct"] <= 1 and 0 <= x["null_pct_disc"] <= 1 and x["healed_ref_nll"] > 0
        assert 0 <= x["anti_steerable"] <= 1
        heal_ev = events.first(recs, "heal", round=x["round"])  # the heal's recorded fields, under their record names
        assert (x["heal_nll_first"], x["heal_nll"]) == (heal_ev["nll_first"], heal_ev["nll_last"])


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
    summary = (root / "summary.md").read_text()
    verdict = run_verdict(RunInfo.read(root))  # recomputed from events.jsonl alone
    # the tiny random model holds no trait to move: its healed shift's interval cannot clear 0 and the null
    assert verdict.startswith("INCONCLUSIVE: auth_nats") and verdict in summary and "dDisc [95% CI]" in summary
    _export_is_the_baked_student(root)
    for r in (0, 1):
        assert (root / "export" / "adapters" / f"r{r:02d}" / "adapter_model.safetensors").is_file()
    rows = ledger.read(fast_run / "results.jsonl")
    assert rows[-1]["run"] == "a" and rows[-1]["n_rounds_done"] == 2


def test_same_seed_same_numbers(fast_run, tmp_path):
    assert _run(fast_args(tmp_path, "b")) == 0
    keys = ("auth_nats", "care_nats", "p_ans_any", "prefill_nll")

    def nums(root):
        return [[x[k] for k in keys] for x in events.read(root, "eval")]

    assert nums(fast_run / "a") == nums(tmp_path / "b")


def test_nan_stops_the_round_and_resume_finishes(tmp_path, monkeypatch):
    # NaN from the first micro-batch of round 1, as diverged weights would give; --max-bad-steps 0: stop at once
    inject(monkeypatch, nll=math.nan, when=lambda student: student.training == "r01")
    assert _run(fast_args(tmp_path, "c", "--max-bad-steps", "0")) == 4
    root = tmp_path / "c"
    recs = events.read(root)
    assert [x["round"] for x in recs if x["stage"] == "round"] == [0]
    stop = [x for x in recs if x["stage"] == "stop"][-1]
    assert "step 0" in stop["reason"] and "nll=" in stop["reason"]
    assert (root / "rounds" / "r00" / "DONE").is_file() and not (root / "rounds" / "r01" / "DONE").exists()
    assert (root / "rounds" / "r00" / "adapter" / "r00" / "adapter_model.safetensors").is_file()
    # resume: continues after round 0, and every round is recorded exactly once
    monkeypatch.undo()
    written = len(events.read(root, raw=True))
    assert _run(["--resume", str(root)]) == 0
    recs = events.read(root)
    assert [x["round"] for x in recs if x["stage"] == "round"] == [0, 1]
    assert sum(1 for x in recs if x["stage"] == "eval" and x["model"] == "base") == 1
    assert _round_stages(recs, 1) == STAGES
    assert not [x for x in recs if x["stage"] == "stop"]  # the stop belonged to the attempt that was continued
    raw = events.read(root, raw=True)  # append-only: the first attempt's lines are still there
    assert len(raw) > written and [x["stage"] for x in raw[written:]][0] == "resume"


def test_starvation_ends_cleanly_with_the_q0_table(tmp_path):
    # An absolute perplexity ceiling of 1.0 rejects every completion: the dose controller must walk
    # down to its floor, then stop the run with exit code 3 and leave the run directory readable.
    assert _run(fast_args(tmp_path, "s", "--ppl-max", "1.0")) == 3
    root = tmp_path / "s"
    recs = events.read(root)
    stop = [x for x in recs if x["stage"] == "stop"]
    assert len(stop) == 1 and stop[0]["code"] == 3 and "only 0 completions kept" in stop[0]["reason"]
    last = [x for x in recs if x["stage"] == "filter"][-1]
    assert last["starved"] and last["n_kept"] == 0 and last["q0"][0]["kept_frac"] == 0.0
    assert (root / "rounds" / "r00" / "completions.jsonl").is_file()
    assert "FAIL" in (root / "summary.md").read_text()
    assert recs[-1]["stage"] == "summary"


def test_collapse_signals_recorded_each_round(fast_run):
    recs = events.read(fast_run / "a", "collapse")
    assert [(x["round"], x["model"]) for x in recs] == [(-1, "base"), (0, "healed"), (1, "healed")]
    for x in recs:
        assert 1 <= x["pr_band"] <= x["n_acts"] - 1 and 1 <= x["pr_final"] <= x["n_acts"] - 1
        assert 0 < x["entropy_p5"] <= x["entropy_mean"] and x["amp"] > 0
    for x in events.read(fast_run / "a", "round"):
        assert x["barrier_skipped"] == 0 and x["steps_skipped"] == 0 and x["pr_band"] is not None
    assert "## Collapse signals" in (fast_run / "a" / "summary.md").read_text()


@pytest.mark.parametrize(
    "flags",
    [
        ["--heal-target", "kl_teacher"],
        ["--heal-target", "mix", "--teacher-topk", "16", "--trust-kl-max", "5"],
        ["--heal-target", "kl_teacher", "--heal-data", "on_policy", "--on-policy-frac", "0.5"],
    ],
    ids=["kl_teacher", "mix-topk-trust", "on_policy"],
)
def test_each_heal_target_runs_and_is_recorded(tmp_path, flags):
    assert _run(fast_args(tmp_path, "t", *flags, rounds=1)) == 0
    (heal,) = events.read(tmp_path / "t", "heal")
    assert heal["target"] == flags[1] and heal["kd_first"] is not None and heal["kd_last"] >= 0
    steps = events.read(tmp_path / "t", "heal_step")
    assert all("kd" in x for x in steps)
    if "--trust-kl-max" in flags:
        assert 0 <= heal["masked_share"] <= 1
    if "on_policy" in flags:
        assert heal["n_on_policy"] + heal["n_steered"] == heal["n_train"] and heal["n_on_policy"] > 0
        assert (tmp_path / "t" / "rounds" / "r00" / "on_policy.jsonl").is_file()


def test_the_instrument_is_announced_before_round_0(tmp_path):
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:
        assert _run(fast_args(tmp_path, "inst", rounds=1)) == 0
    finally:
        logger.remove(sink)
    inst = [i for i, x in enumerate(lines) if x.startswith("instrument: the eval's item discrimination")]
    first_round = min(i for i, x in enumerate(lines) if x.startswith("extract r0"))
    assert inst and inst[0] < first_round

"""Config validation derived from the field types, presets, and resume merging."""

from __future__ import annotations

import dataclasses

import pytest

from steer_heal import config
from steer_heal.config import Range, leaves, parse_args, resume_config, to_dict, validate
from steer_heal.errors import UserError


def test_every_numeric_field_declares_its_valid_range():
    """A new int/float field without a Range in its type would be checked only for finiteness: list them."""
    unchecked = []
    for _, name, v, hint in leaves(config.RunConfig()):
        rng, _ = config.range_of(hint)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and rng is None:
            unchecked.append(name)
    assert unchecked == ["lam_round_pow"]  # any exponent whose schedule stays finite (bounds.lam_schedule_error)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tau", "nan"], "--tau nan must be a finite number"),
        (["--lam", "inf"], "--lam inf must be a finite number"),
        (["--alphas", "nan", "1"], "--alphas nan 1.0 must be one or more finite numbers, each > 0"),
        (["--max-new-tokens", "1000000000"], "--max-new-tokens 1000000000 must be an integer >= 1 and <= 32768"),
        (["--top-p", "1.5"], "--top-p 1.5 must be a finite number > 0 and <= 1"),
        (["--temperature", "0"], "--temperature 0.0 must be a finite number > 0"),
        (["--max-grad-norm", "-1"], "--max-grad-norm -1.0 must be a finite number > 0"),
        (["--seed", str(2**32)], f"--seed {2**32} must be an integer >= 0 and <= 4294967295"),
        (["--min-train", "50"], "--min-train 50 must be <= --n-keep 8"),
        (["--device", "tpu"], "--device 'tpu' must be auto, cpu, cuda, cuda:N or mps"),
        (["--lora-layers", "0.8", "0.2"], "--lora-layers (0.8, 0.2) must be fractions of depth"),
        (["--pr-contexts", "1"], "--pr-contexts 1 must be an integer >= 2"),
    ],
)
def test_validate_names_the_flag_the_value_and_what_is_valid(flags, message):
    with pytest.raises(UserError) as e:
        validate(parse_args(["--fast-dev-run", *flags]))
    assert str(e.value).startswith(message)


def test_every_preset_is_valid():
    for name in config.PRESETS:
        validate(config.preset(name))


def test_range_bounds():
    r = Range(0, 1, lo_open=True)
    assert not r.ok(0) and r.ok(1e-9) and r.ok(1) and not r.ok(1.0001) and not r.ok(float("nan"))
    assert r.describe("a finite number") == "a finite number > 0 and <= 1"


def test_resume_takes_the_stored_config_and_only_n_rounds():
    stored = to_dict(parse_args(["--fast-dev-run", "--seed", "3"]))
    cmd = parse_args(["--resume", "x", "--n-rounds", "5"])
    merged = resume_config(cmd, stored, ["--resume", "x", "--n-rounds", "5"], "x")
    assert merged.seed == 3 and merged.preset == "fast" and merged.n_rounds == 5 and str(merged.where.resume) == "x"


def test_fast_dev_run_on_a_resume_says_nothing_the_stored_config_does_not():
    """--fast-dev-run was a resumable field; as an alias of --preset fast it must still not reopen the check."""
    stored = to_dict(parse_args(["--fast-dev-run", "--lam", "0.7", "--seed", "2"]))
    argv = ["--fast-dev-run", "--resume", "x"]
    merged = resume_config(parse_args(argv), stored, argv, "x")
    assert merged.heal.lam == 0.7 and merged.seed == 2


def test_resume_with_agreeing_flags_keeps_the_stored_config():
    stored = to_dict(parse_args(["--fast-dev-run", "--n-rounds", "5", "--lam", "0.7"]))
    argv = ["--fast-dev-run", "--resume", "x", "--lam", "0.7"]
    merged = resume_config(parse_args(argv), stored, argv, "x")
    assert merged.n_rounds == 5 and merged.heal.lam == 0.7  # not the preset's n_rounds 2


def test_resume_conflict_names_each_differing_key():
    stored = to_dict(parse_args(["--fast-dev-run"]))
    argv = ["--fast-dev-run", "--resume", "x", "--reg", "nll", "--lam", "0.1"]
    with pytest.raises(UserError) as e:
        resume_config(parse_args(argv), stored, argv, "x")
    msg = str(e.value)
    assert "--reg: run has 'kl_rev', command line gives 'nll'" in msg and "--lam: run has 0.3" in msg
    assert "--tau" not in msg  # keys that agree are not listed


def test_resume_refuses_a_corrupt_stored_config():
    stored = to_dict(parse_args(["--fast-dev-run"]))
    with pytest.raises(UserError, match="config.json holds no usable config"):
        resume_config(parse_args([]), dict(stored, heal="oops"), ["--resume", "x"], "x")
    with pytest.raises(UserError, match="stored config is invalid: --tau nan"):
        bad = dict(stored, heal=dict(stored["heal"], tau=float("nan")))
        resume_config(parse_args([]), bad, ["--resume", "x"], "x")


def test_fields_are_unique_across_stages():
    """Flags are flat, so a field name may appear in only one stage."""
    names = [name for _, name, _, _ in leaves(config.RunConfig())]
    assert len(names) == len(set(names))
    assert dataclasses.is_dataclass(config.RunConfig().heal)


def test_where_a_run_lives_is_one_dataclass_that_the_resume_ledger_and_sweep_lists_read():
    """RESUMABLE, ledger.NOT_ARM and the sweep's reserved axes all come from WhereConfig's fields."""
    from steer_heal import ledger
    from steer_heal.config import RESUMABLE, WHERE

    assert set(WHERE) == {"out_dir", "run_name", "resume", "plan", "plan_memory_gb"}
    assert RESUMABLE == {"n_rounds", *WHERE} and set(WHERE) < set(ledger.NOT_ARM)
    cfg = parse_args(["--out-dir", "o", "--run-name", "n", "--plan"])
    assert (str(cfg.where.out_dir), cfg.where.run_name, cfg.where.plan) == ("o", "n", True)  # flags stay flat
    a, b = to_dict(parse_args(["--seed", "1", "--out-dir", "x"])), to_dict(parse_args(["--run-name", "y"]))
    assert ledger.arm_config(a) == ledger.arm_config(b)  # one arm: they differ only in where and the seed


def test_a_stored_config_from_before_the_split_still_resumes():
    """config.json written before WhereConfig held out_dir / run_name / fast_dev_run at the top level."""
    stored = to_dict(parse_args(["--fast-dev-run", "--seed", "3"]))
    old = {k: v for k, v in stored.items() if k != "where"} | {"out_dir": "out", "run_name": "r", "fast_dev_run": True}
    merged = resume_config(parse_args(["--resume", "x"]), old, ["--resume", "x"], "x")
    assert merged.seed == 3 and merged.preset == "fast" and str(merged.where.resume) == "x"

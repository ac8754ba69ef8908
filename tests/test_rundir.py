"""Run-directory plumbing: atomic writes keep the old file whole when a write fails, and an edited config is
named field by field (only where a run lives and how far it goes may change)."""

from __future__ import annotations

import json

import pytest

from steer_heal.config import RESUMABLE, parse_args, to_dict
from steer_heal.rundir import atomic_write, atomic_write_json, config_edits


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"v": 1})

    def dies(tmp):
        tmp.write_text('{"v": 2, "half')  # half-written, then the process is interrupted
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies)
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_config_edits_name_each_changed_setting_but_not_where_the_run_lives():
    started = to_dict(parse_args(["--fast-dev-run"]))
    now = to_dict(parse_args(["--fast-dev-run", "--seed", "7", "--lam", "0.7", "--out-dir", "elsewhere"]))
    assert config_edits(now, started, RESUMABLE) == ["--lam: 0.7 (was 0.3)", "--seed: 7 (was 0)"]
    assert config_edits(started, started, RESUMABLE) == []

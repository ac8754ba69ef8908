"""The command line's error contract: bad input exits 2 with one line naming the value, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


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

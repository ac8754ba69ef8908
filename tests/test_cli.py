"""The command line's error contract: bad input exits 2 with one line naming the value and what is valid,
no traceback, nothing left behind; a refused resume changes nothing; Ctrl-C and a full disk end with one
line, a `stop` event and a resumable run directory."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steer_heal import events
from steer_heal.run import main
from tests.conftest import fast_args


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "steer_heal.run", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def _run_main(capsys, *args) -> tuple[int, list[str]]:
    """main() in-process (no interpreter start-up: ~12 s saved per case): (exit code, stderr lines). An
    uncaught exception, which a user would see as a traceback, fails the test."""
    try:
        code = main(list(args))
    except SystemExit as e:  # tyro rejects an unknown choice itself, with its usage box
        code = e.code
    return code, [x for x in capsys.readouterr().err.splitlines() if x.strip()]


def _main(capsys, *args) -> tuple[int, str]:
    """(exit code, the last line on stderr): the one line a bad input must end with."""
    code, err = _run_main(capsys, *args)
    return code, err[-1] if err else ""


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    p = _cli("--fast-dev-run", "--tau", "nan", "--out-dir", str(tmp_path))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == ["error: --tau nan must be a finite number"]


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
def test_bad_input_exits_nonzero_naming_the_value(args, needle, tmp_path, capsys):
    code, err = _run_main(capsys, *args, "--out-dir", str(tmp_path))
    assert code == 2, err
    assert needle in "\n".join(err)


BAD_VALUES = [
    # every float must be finite (NaN used to switch the barrier off silently or crash later)
    (["--tau", "nan"], "--tau nan must be a finite number"),
    (["--lam", "nan"], "--lam nan must be a finite number"),
    (["--coh-floor", "nan"], "--coh-floor nan"),
    (["--lr", "nan"], "--lr nan"),
    (["--alphas", "nan", "1"], "--alphas nan 1.0 must be one or more finite numbers, each > 0"),
    (["--eval-alpha", "nan"], "--eval-alpha nan"),
    (["--iso-kl", "nan"], "--iso-kl nan"),
    (["--lam-round-pow", "inf"], "--lam-round-pow inf"),
    # signs and ranges
    (["--max-grad-norm", "-1"], "--max-grad-norm -1.0 must be a finite number > 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm 0.0 must be a finite number > 0"),
    (["--temperature", "0"], "--temperature 0.0 must be a finite number > 0"),
    (["--temperature", "-1"], "--temperature -1.0"),
    (["--top-p", "0"], "--top-p 0.0 must be a finite number > 0 and <= 1"),
    (["--top-p", "1.5"], "--top-p 1.5"),
    (["--lora-alpha", "0"], "--lora-alpha 0.0 must be a finite number > 0"),
    (["--max-new-tokens", "1000000000"], "--max-new-tokens 1000000000 must be an integer >= 1 and <= 32768"),
    (["--min-train", "100"], "--min-train 100 must be <= --n-keep 8"),
    (["--ppl-max", "0"], "--ppl-max 0.0 must be a finite number > 0"),
    (["--ppl-max", "-5"], "--ppl-max -5.0"),
    (["--seed", "4294967296"], "--seed 4294967296 must be an integer >= 0 and <= 4294967295"),
    (["--seed", "-1"], "--seed -1"),
    (["--n-rounds", "0"], "--n-rounds 0 must be an integer >= 1"),
    (["--epochs", "0"], "--epochs 0"),
    (["--lora-r", "0"], "--lora-r 0"),
    (["--n-vignettes", "0"], "--n-vignettes 0"),
    (["--kappa-floor", "0"], "--kappa-floor 0.0 must be a finite number > 0 and <= 1"),
    (["--keep-target", "1.5"], "--keep-target 1.5"),
    (["--tail-frac", "0"], "--tail-frac 0.0"),
    (["--ppl-quantile", "2"], "--ppl-quantile 2.0"),
    (["--lora-layers", "0.8", "0.2"], "--lora-layers (0.8, 0.2) must be fractions of depth"),
    (["--iso-kl", "0"], "--iso-kl 0.0 must be a finite number > 0"),
    (["--warmup-frac", "1.5"], "--warmup-frac 1.5"),
    (["--pr-contexts", "1"], "--pr-contexts 1 must be an integer >= 2"),
    (["--n-contexts", "1"], "--n-contexts 1 must be an integer >= 2"),
    (["--device", "tpu"], "--device 'tpu' must be auto, cpu, cuda, cuda:N or mps"),
    (["--persona-pos", "someone calm"], "--persona-pos and --persona-neg must be given together"),
    # found once the inputs are read, still before any directory exists
    (["--device", "cuda:9"], "--device cuda:9: this machine has"),
    (["--lora-targets", "no_such_proj"], "--lora-targets ['no_such_proj'] match no linear layer"),
    (["--n-contexts", "500"], "has 288 contexts; --n-contexts 500 needs at least that many"),
]


@pytest.mark.parametrize("args, message", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_are_refused_up_front(capsys, tmp_path, args, message):
    code, last = _main(capsys, "--fast-dev-run", "--out-dir", str(tmp_path / "out"), *args)
    assert code == 2 and message in last, last
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no orphan run dir


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_bad_files_are_refused_before_a_run_directory_exists(capsys, tmp_path):
    out = tmp_path / "out"
    cases = {
        "duplicate vignette ids": (
            ["--eval-vignettes", _write(tmp_path / "v.jsonl", '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')],
            "records 1 and 2 share the id 'a'",
        ),
        "persona sign": (
            [
                "--personas-file",
                _write(
                    tmp_path / "p.json", json.dumps({"odd": {"pos": "a b", "neg": "c d", "trait": "Care", "sign": 0}})
                ),
                "--persona",
                "odd",
            ],  # fmt: skip
            "field sign: 0 must be -1",
        ),
        "short contexts file": (
            ["--contexts-file", _write(tmp_path / "c.jsonl", '{"text": "hi"}\n' * 5)],
            "has 5 contexts; --n-contexts 16 needs at least that many",
        ),
        "missing reference file": (["--reference-file", str(tmp_path / "nope.jsonl")], "nope.jsonl: no such file"),
    }
    for name, (args, message) in cases.items():
        code, last = _main(capsys, "--fast-dev-run", "--out-dir", str(out), *args)
        assert code == 2 and message in last, (name, last)
    assert not out.exists() or not any(out.iterdir())


def test_out_dir_must_be_a_writable_directory(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, last = _main(capsys, "--fast-dev-run", "--out-dir", str(afile))
    assert code == 2 and f"--out-dir {afile} is a file" in last
    code, last = _main(capsys, "--fast-dev-run", "--out-dir", "/proc/steer_heal_out")
    assert code == 2 and "--out-dir /proc/steer_heal_out: inside /proc, a kernel pseudo-filesystem" in last


def test_pseudo_filesystems_are_told_from_storage():
    from steer_heal.rundir import pseudo_fs

    cases = {"/proc/version": "/proc", "/sys": "/sys", "/dev/null": "/dev", "/dev/shm/run": None, "/tmp/x": None,
             "/procx/y": None}  # fmt: skip
    assert {p: pseudo_fs(Path(p)) for p in cases} == {p: Path(v) if v else None for p, v in cases.items()}


@pytest.mark.parametrize("fault", ["write fails", "write vanishes"])
def test_an_unwritable_out_dir_leaves_no_directory_behind(tmp_path, monkeypatch, fault):
    """A write that fails (a read-only mount) or that is swallowed (it does not read back) refuses the
    directory and removes the parents this check created."""
    from pathlib import Path

    from steer_heal.errors import UserError
    from steer_heal.rundir import writable_dir

    def read_only(self, data):
        raise OSError(errno.EROFS, "Read-only file system")

    if fault == "write fails":
        monkeypatch.setattr(Path, "write_bytes", read_only)
    else:
        monkeypatch.setattr(Path, "read_bytes", lambda self: b"")
    with pytest.raises(UserError, match=r"--out-dir .*/a/b: cannot write there"):
        writable_dir(tmp_path / "a" / "b", "--out-dir")
    assert list(tmp_path.iterdir()) == []


def test_proc_version_out_dir_is_refused_in_one_line_leaving_nothing(tmp_path):
    """/proc/version is a kernel file that some sandboxes let a process "write into": the run must not start."""
    p = _cli("--fast-dev-run", "--out-dir", "/proc/version", "--run-name", "x", cwd=tmp_path)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --out-dir /proc/version"), p.stderr
    assert "kernel pseudo-filesystem" in lines[0]  # refused for what it is, not only for being a file
    assert list(tmp_path.iterdir()) == []


def test_bad_files_name_file_and_line(tmp_path, capsys):
    bad = tmp_path / "ctx.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    code, last = _main(capsys, "--fast-dev-run", "--contexts-file", str(bad), "--out-dir", str(tmp_path))
    assert code == 2 and f"{bad}:2" in last
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, last = _main(capsys, "--fast-dev-run", "--eval-vignettes", str(empty), "--out-dir", str(tmp_path))
    assert code == 2 and "empty" in last


def test_corrupt_model_files_are_named(tmp_path, capsys):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    code, last = _main(capsys, "--fast-dev-run", "--model", str(gguf), "--out-dir", str(tmp_path))
    assert code == 2 and str(gguf) in last
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{not json")
    code, last = _main(capsys, "--fast-dev-run", "--model", str(ckpt), "--out-dir", str(tmp_path))
    assert code == 2 and str(ckpt) in last


def test_truncated_gguf_is_named(capsys, tmp_path):
    from steer_heal.models import embedded_gguf

    whole = embedded_gguf().read_bytes()
    for n in (100, 1_000_000):  # the header cut short; the tensor data cut short
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(whole[:n])
        code, last = _main(capsys, "--fast-dev-run", "--model", str(cut), "--out-dir", str(tmp_path / "o"))
        assert code == 2 and f"cannot read GGUF file {cut} (truncated" in last


def test_model_cache_race_keeps_the_winners_copy(tmp_path):
    """Two first runs started together both de-quantise the GGUF; the second rename finds the first's
    complete directory and keeps it (it used to fail with 'Directory not empty')."""
    from steer_heal.models import publish_dir

    def converted(name: str, weights: str):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_text(weights)
        return d

    target = tmp_path / "model"
    publish_dir(converted("model.tmp1", "first"), target)
    publish_dir(converted("model.tmp2", "second"), target)
    assert (target / "model.safetensors").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    half = tmp_path / "half"  # a target without config.json is not a finished copy: the error stands
    (half / "junk").mkdir(parents=True)
    with pytest.raises(OSError):
        publish_dir(converted("half.tmp3", "third"), half)


# ---------------------------------------------------------------- resume


def _snapshot(root) -> dict:
    """Every file under root with its content hash: a refused resume must leave all of it unchanged."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture()
def finished(fast_run, tmp_path):
    """A private copy of the finished fast run to break, with its own --out-dir (and so its own ledger)."""
    root = tmp_path / "run"
    shutil.copytree(fast_run / "a", root)
    meta = json.loads((root / "config.json").read_text())
    meta["config"]["where"]["out_dir"] = str(tmp_path)
    (root / "config.json").write_text(json.dumps(meta))
    return root


def _break_done(root):
    (root / "rounds" / "r00" / "DONE").unlink()


def _break_config(root):
    (root / "config.json").write_text("{not json")


def _drop_config_key(root):
    meta = json.loads((root / "config.json").read_text())
    meta.pop("config")
    (root / "config.json").write_text(json.dumps(meta))


def _drop_adapter(root):
    shutil.rmtree(root / "rounds" / "r01" / "adapter")


def _stale_done(root):
    (root / "rounds" / "r02").mkdir()
    (root / "rounds" / "r02" / "DONE").write_text("{}")


def _nan_in_config(root):
    meta = json.loads((root / "config.json").read_text())
    meta["config"]["heal"]["tau"] = float("nan")
    (root / "config.json").write_text(json.dumps(meta))


def _seed_edited(root):
    meta = json.loads((root / "config.json").read_text())
    meta["config"]["seed"] = 7
    (root / "config.json").write_text(json.dumps(meta))


def _junk_line(at: int | None):
    def write(root):
        lines = (root / "events.jsonl").read_text().splitlines(keepends=True)
        lines.insert(len(lines) if at is None else at - 1, "not a record\n")  # a whole line: no crash writes that
        (root / "events.jsonl").write_text("".join(lines))

    return write


@pytest.mark.parametrize(
    "breaks, message",
    [
        (
            _seed_edited,
            "config.json: changed since the run started (its config record in events.jsonl) in --seed: 7 "
            "(was 0); restore it",
        ),
        (_junk_line(3), "events.jsonl:3: corrupt event line"),
        (_junk_line(None), "corrupt event line (Expecting value); only a record torn by a crash"),
        (_break_done, "but round 0 does not; finished rounds must be 0..n-1"),
        (_break_config, "config.json: corrupt config file"),
        (_drop_config_key, "config.json: no 'config' object in it"),
        (_drop_adapter, "round 1 is marked done but its adapter is missing"),
        (_stale_done, "round 2 is marked done but events.jsonl has no record of it"),
        (_nan_in_config, "its stored config is invalid: --tau nan"),
    ],
)
def test_a_broken_run_directory_is_refused_and_left_unchanged(capsys, finished, breaks, message):
    breaks(finished)
    before = _snapshot(finished)
    code, last = _main(capsys, "--resume", str(finished), "--n-rounds", "3")
    assert code == 2 and message in last, last
    assert _snapshot(finished) == before


def test_resume_refuses_a_changed_config(fast_run, capsys):
    before = _snapshot(fast_run / "a")
    code, last = _main(capsys, "--fast-dev-run", "--resume", str(fast_run / "a"), "--reg", "nll", "--out-dir",
                       str(fast_run))  # fmt: skip
    assert code == 2 and "reg" in last and "'kl_rev'" in last
    assert _snapshot(fast_run / "a") == before
    code, last = _main(capsys, "--resume", str(fast_run / "nowhere"))
    assert code == 2 and "not a steer_heal run directory" in last


def test_resume_of_a_finished_run_keeps_one_ledger_row_and_removes_stale_temps(capsys, finished):
    from steer_heal import ledger

    stale = finished / ".export.tmp999999"  # what a kill during export leaves: a half-written model copy
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    path = finished.parent / "results.jsonl"
    ledger.append(path, {"run": finished.name, "n_rounds_done": 2, "verdict": "from the first attempt"})
    assert main(["--resume", str(finished)]) == 0
    assert not stale.exists()
    rows = ledger.read(path)
    assert len(path.read_text().splitlines()) == 2  # appended, never rewritten ...
    assert (
        len(rows) == 1 and rows[0]["n_rounds_done"] == 2 and "first attempt" not in rows[0]["verdict"]
    )  # ... counted once


def test_resume_after_a_torn_last_line_repairs_it_and_finishes(capsys, finished):
    from steer_heal import ledger

    events_path = finished / "events.jsonl"
    with events_path.open("a") as f:
        f.write('{"sch')  # a kill mid-append: the one thing a crash leaves in an append-only file
    assert main(["--resume", str(finished)]) == 0  # used to fail at the summary: the fragment was then mid-file
    assert all(json.loads(x) for x in events_path.read_text().splitlines())  # cut, not left mid-file
    assert events.read(finished, "summary") and "removed a record torn by a crash" in capsys.readouterr().err
    assert [r["run"] for r in ledger.read(finished.parent / "results.jsonl")] == ["run"]  # and its ledger row


def test_a_run_seeded_by_the_old_scheme_is_not_resumed_under_the_new_one(capsys, finished):
    """A run started before 2026-12-08 has no seed_scheme in its config.json: continuing it here would draw its
    later rounds from other seeds than its earlier ones."""
    meta = json.loads((finished / "config.json").read_text())
    assert meta.pop("seed_scheme") == "blake2b-63"
    (finished / "config.json").write_text(json.dumps(meta))
    (finished / "rounds" / "r01" / "DONE").unlink()  # something left to resume
    code, last = _main(capsys, "--resume", str(finished))
    assert code == 2 and "seeded by the 'arithmetic' scheme (runs started before 2026-12-08)" in last, last


def test_resume_writes_the_ledger_beside_the_run_whatever_config_json_and_the_cwd_say(capsys, finished, monkeypatch):
    from steer_heal import ledger

    meta = json.loads((finished / "config.json").read_text())
    meta["config"]["where"]["out_dir"] = "elsewhere"  # relative, and not where the run lies
    (finished / "config.json").write_text(json.dumps(meta))
    (finished.parent / "cwd").mkdir()
    monkeypatch.chdir(finished.parent / "cwd")
    code, last = _main(capsys, "--resume", "../run", "--out-dir", "other")
    assert code == 2 and f"--out-dir other: the run being resumed lies in {finished.parent} " in last, last
    assert main(["--resume", "../run"]) == 0
    assert [r["run"] for r in ledger.read(finished.parent / "results.jsonl")] == ["run"]
    assert not (finished.parent / "cwd" / "elsewhere").exists()


# ---------------------------------------------------------------- interruptions


def test_ctrl_c_ends_with_one_line_a_stop_event_and_a_resumable_run(tmp_path):
    root = tmp_path / "i"
    cmd = [sys.executable, "-m", "steer_heal.run", *fast_args(tmp_path, "i", rounds=3)]
    # SIGINT at its default in the child even when this test runs in a background job (which ignores it, and a
    # Python started with SIGINT ignored never raises KeyboardInterrupt)
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline, started = time.time() + 900, False  # generous: a loaded 2-core machine runs the fast run slowly
    while time.time() < deadline and p.poll() is None:  # wait until round 1 has started: round 0 is then on disk
        if started := (root / "rounds" / "r00" / "DONE").exists() and (root / "rounds" / "r01").exists():
            break
        time.sleep(0.05)
    assert started, f"round 1 never started (exit {p.poll()})"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "interrupted (Ctrl-C)" in lines[0] and f"--resume {root}" in lines[0]
    stop = events.read(root, "stop")
    assert len(stop) == 1 and stop[0]["code"] == 130 and "interrupted" in stop[0]["reason"]
    assert (root / "rounds" / "r00" / "DONE").is_file()
    r = subprocess.run([sys.executable, "-m", "steer_heal.run", "--resume", str(root)], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x["round"] for x in events.read(root, "round")] == [0, 1, 2]


def test_a_full_disk_ends_with_one_line_a_stop_event_and_a_resumable_run(capsys, tmp_path, monkeypatch):
    from steer_heal import recorder

    real = recorder.save_tensors

    def full_in_round_1(path, *a, **kw):
        if "r01" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(recorder, "save_tensors", full_in_round_1)
    code, last = _main(capsys, *fast_args(tmp_path, "d"))
    assert code == 2 and "No space left on device" in last and "--resume" in last
    root = tmp_path / "d"
    stop = events.read(root, "stop")
    assert len(stop) == 1 and "I/O error during round 1" in stop[0]["reason"]
    assert not list(root.rglob(".*.tmp*"))  # nothing half-written is left
    monkeypatch.undo()
    assert main(["--resume", str(root)]) == 0
    assert [x["round"] for x in events.read(root, "round")] == [0, 1]

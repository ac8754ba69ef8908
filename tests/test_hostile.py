"""The hostile suite: inputs chosen to break the tool, across flags, data files, model files, paths, faults and
scripts. Every refusal must end the same way: exit 2, exactly one `error:` line (naming the value), no
traceback, and the file system exactly as it was (nothing created, nothing removed). Every fault must leave a
run that a resume finishes with the numbers an uninterrupted run gets.

Cases run in-process (`main(argv)`), so the suite costs seconds, not an interpreter start per case.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

from steer_heal import null
from steer_heal.run import main

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) ")  # our own log lines may precede the error


def tree(root: Path) -> set[str]:
    """Every path under root (files, directories, links), relative: what a refusal must leave as it found it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def refused(capsys, root: Path, argv: list[str], needle: str, entry=main) -> str:
    """Run `entry(argv)` in `root` and check the refusal contract; returns the error line."""
    before = tree(root)
    try:
        code = entry(argv)
    except SystemExit as e:  # nothing should exit past our one-line handler, but report it if it does
        code = e.code
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    assert len(errors) == 1 and lines[-1] == errors[0], err  # one error line, and it ends the output
    assert all(LOG_LINE.match(x) for x in lines[:-1]), err  # anything before it is a log line, not a usage box
    assert needle in errors[0], errors[0]
    assert tree(root) == before, sorted(tree(root) ^ before)  # nothing created, nothing removed
    return errors[0]


def _link_loop(tmp: Path, name: str) -> str:
    """A path that is a symlink to itself: resolving it never ends."""
    (tmp / name).symlink_to(tmp / name)
    return str(tmp / name)


def _bytes(s: str) -> str:
    """A command-line argument holding the byte 0xff, as Python hands such an argv to a program."""
    return os.fsdecode(os.fsencode(s) + b"\xff")


# ---------------------------------------------------------------- flags: parse errors, ranges, and meaning

FLAGS = {
    # what the parser sees (tyro's boxed messages used to reach the user)
    "seed not a number": (["--seed", "abc"], "--seed 'abc' is not an integer"),
    "seed a float": (["--seed", "1.5"], "--seed '1.5' is not an integer"),
    "seed in hex": (["--seed", "0x10"], "--seed '0x10' is not an integer"),
    "seed in exponent form": (["--seed", "1e3"], "--seed '1e3' is not an integer"),
    "seed not UTF-8": (["--seed", _bytes("1")], "has bytes that are not UTF-8"),
    "n-rounds a float": (["--n-rounds", "1.5"], "--n-rounds '1.5' is not an integer"),
    "n-rounds empty": (["--n-rounds", ""], "--n-rounds '' is not an integer"),
    "lr not a number": (["--lr", "abc"], "--lr 'abc'"),
    "lr half an exponent": (["--lr", "1e"], "--lr '1e'"),
    "alphas without values": (["--alphas"], "--alphas (none) must be one or more finite numbers"),
    "alphas with a word": (["--alphas", "1", "abc"], "--alphas 'abc'"),
    "band with one value": (["--steer-layers", "0.4"], "--steer-layers needs 2 values, got 1"),
    "band with a word": (["--steer-layers", "0.4", "x"], "--steer-layers"),
    "run name that reads as a flag": (["--run-name", "-x"], "'-x' is read as a flag"),
    "value missing at the end": (["--run-name"], "--run-name needs a value"),
    "switch given a value": (["--normalize=1"], "--normalize takes no value"),
    "unknown flag": (["--frobnicate"], "unknown flag '--frobnicate'"),
    "misspelt flag": (["--n-round", "3"], "did you mean --n-rounds?"),
    "stray positional": (["extra"], "unexpected argument 'extra'"),
    "double dash": (["--"], "unexpected argument '--'"),
    "choice missing": (["--reg"], "--reg needs a value"),
    "unknown barrier": (["--reg", "L2"], "L2"),
    "unknown prompt format": (["--prompt-format", "nope"], "nope"),
    "unknown decode path": (["--decode", "nope"], "nope"),
    "persona text not UTF-8": (["--persona-pos", _bytes("calm"), "--persona-neg", "x y"], "not UTF-8"),
    "device with a newline": (["--device", "cpu\n"], "--device 'cpu\\n' must be auto, cpu, cuda, cuda:N or mps"),
    # ranges the types declare
    "n-rounds above its range": (["--n-rounds", "1001"], "--n-rounds 1001 must be an integer >= 1 and <= 1000"),
    "negative lam": (["--lam", "-1"], "--lam -1.0"),
    "top-p nan": (["--top-p", "nan"], "--top-p nan must be a finite number"),
    "kappa floor above 1": (["--kappa-floor", "1.5"], "--kappa-floor 1.5"),
    "zero strength": (["--alphas", "0"], "--alphas 0.0 must be one or more finite numbers, each > 0"),
    "negative strength": (["--alphas", "1", "-1"], "--alphas 1.0 -1.0"),
    "negative eval strength": (["--eval-alpha", "-1"], "--eval-alpha -1.0"),
    "negative iso-KL target": (["--iso-kl", "-1"], "--iso-kl -1.0"),
    "plan memory zero": (["--plan-memory-gb", "0"], "--plan-memory-gb 0.0"),
    "plan memory nan": (["--plan-memory-gb", "nan"], "--plan-memory-gb nan"),
    "no contexts": (["--n-contexts", "0"], "--n-contexts 0"),
    "inf learning rate": (["--lr", "inf"], "--lr inf must be a finite number"),
    "huge decode budget": (["--max-new-tokens", "99999999999999999999"], "--max-new-tokens"),
    # bounds by meaning (bounds.py): finite, type-correct, and still no meaningful run
    "strength beyond float32": (["--alphas", "1e30"], "beyond any meaningful strength"),
    "one of three strengths beyond": (["--alphas", "1", "2", "3e20"], "--alphas 3e+20 is beyond any meaningful"),
    "eval strength beyond float32": (["--eval-alpha", "1e30"], "--eval-alpha 1e+30 is beyond any meaningful"),
    "lambda schedule overflows": (["--lam-round-pow", "2000", "--n-rounds", "3"], "valid: --lam-round-pow <= 81.85"),
    "lambda schedule overflows late": (["--lam-round-pow", "100", "--n-rounds", "1000"], "reaches about 1e"),
    "lambda beyond float32": (["--lam", "1e39"], "--lam 1e+39 is beyond float32's largest value"),
    "temperature that is greedy": (["--temperature", "1e-10"], "--temperature 1e-10 is below 2^-24"),
    "temperature that overflows": (["--temperature", "1e-40"], "is below 2^-24"),
    "decay that wipes the adapter": (["--lr", "0.5", "--weight-decay", "2"], "= 1 must be < 1"),
    "walk-C cannot reach min-train": (
        ["--n-prompts", "1", "--alphas", "1", "--max-collect-batches", "2", "--min-train", "8"],
        "--min-train 8 is more than a round can ever generate",
    ),
    "decode budget beyond the context": (["--max-new-tokens", "32000"], "context length"),
    "on-policy data with SFT": (["--heal-data", "on_policy", "--heal-target", "sft"], "--heal-data on_policy needs"),
}


@pytest.mark.parametrize("args, needle", FLAGS.values(), ids=FLAGS.keys())
def test_flags(capsys, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, ["--fast-dev-run", "--out-dir", "out", *args], needle)


# ---------------------------------------------------------------- data files: one schema each, file and line named

NEST = '{"text": ' + "[" * 10_000 + "]" * 10_000 + "}\n"
VIG = {"id": "v1", "text": "You see a man spit on a flag."}
RATED = {f"human_{k}": 10.0 for k in ("Care", "Fairness", "Loyalty", "Authority", "Sanctity", "Liberty", "SocialNorms")}
PAIR = {"pos": "a calm person", "neg": "an angry person", "trait": "Care", "sign": -1}


def _jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def _pairs(**pair) -> bytes:
    return json.dumps({"odd": pair}).encode()


# (flag, file bytes, what the error must say); "{f}" is the file's path
DATA = {
    "context text an integer": ("--contexts-file", _jsonl({"text": 5}), "{f}:1: field text: 5"),
    "context text true": ("--contexts-file", _jsonl({"text": "ok"}, {"text": True}), "{f}:2: field text"),
    "context text blank": ("--contexts-file", _jsonl({"text": "   \t"}), "must not be blank"),
    "context text null": ("--contexts-file", _jsonl({"text": None}), "{f}:1: field text"),
    "context without text": ("--contexts-file", _jsonl({"body": "hi"}), "{f}:1: missing field 'text'"),
    "context line an array": ("--contexts-file", _jsonl([1, 2]), "{f}:1: expected a JSON object, got list"),
    "context line a string": ("--contexts-file", _jsonl('"hello"'), "expected a JSON object, got str"),
    "context not UTF-8": ("--contexts-file", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "{f}:2: byte 0xe9 is not UTF-8"),
    "context UTF-16": ("--contexts-file", '{"text": "hi"}\n'.encode("utf-16"), "is not UTF-8"),
    "context lone surrogate": ("--contexts-file", _jsonl('{"text": "a\\ud800b"}'), "lone surrogate"),
    "context nested deep": ("--contexts-file", NEST.encode(), "{f}:1: nested too deeply"),
    "context truncated line": ("--contexts-file", b'{"text": "ok"}\n{"text": "cut', "{f}:2: not valid JSON"),
    "contexts empty": ("--contexts-file", b"", "{f}: the file is empty"),
    "contexts blank lines only": ("--contexts-file", b"\n\n  \n", "the file is empty"),
    "prompt text an integer": ("--prompts-file", _jsonl({"text": 3}), "{f}:1: field text"),
    "prompt text a list": ("--prompts-file", _jsonl({"text": ["a"]}), "{f}:1: field text"),
    "prompts not UTF-8": ("--prompts-file", b'{"text": "\xff"}\n', "{f}:1: byte 0xff is not UTF-8"),
    "vignette id true": ("--eval-vignettes", _jsonl({**VIG, "id": True}), "{f}:1: field id"),
    "vignette id blank": ("--eval-vignettes", _jsonl({**VIG, "id": " "}), "{f}:1: field id"),
    "vignette ids 1 and '1'": ("--eval-vignettes", _jsonl({**VIG, "id": 1}, {**VIG, "id": "1"}), "share the id"),
    "vignette foundation unknown": (
        "--eval-vignettes",
        _jsonl({**VIG, "foundation_coarse": "Honesty"}),
        "{f}:1: field foundation_coarse",
    ),  # fmt: skip
    "vignette rating text": ("--eval-vignettes", _jsonl({**VIG, **RATED, "human_Care": "high"}), "human_Care"),
    "vignette rating NaN": ("--eval-vignettes", _jsonl({**VIG, **RATED, "human_Care": float("nan")}), "human_Care"),
    "vignette rating negative": ("--eval-vignettes", _jsonl({**VIG, **RATED, "human_Loyalty": -1}), "human_Loyalty"),
    "vignette partial ratings": ("--eval-vignettes", _jsonl({**VIG, "human_Care": 50.0}), "give all seven"),
    "vignette ratings all 0": ("--eval-vignettes", _jsonl({**VIG, **dict.fromkeys(RATED, 0.0)}), "are all 0"),
    "vignette text an integer": ("--eval-vignettes", _jsonl({**VIG, "text": 7}), "{f}:1: field text"),
    "reference without answer": ("--reference-file", _jsonl({"prompt": "Hi?"}), "{f}:1: missing field 'answer'"),
    "reference answer blank": ("--reference-file", _jsonl({"prompt": "Hi?", "answer": ""}), "must not be blank"),
    "reference prompt an integer": ("--reference-file", _jsonl({"prompt": 1, "answer": "Hello."}), "field prompt"),
    "personas a list": ("--personas-file", b"[1, 2]", "expected a non-empty JSON object of named records"),
    "personas empty object": ("--personas-file", b"{}", "expected a non-empty JSON object"),
    "persona sign 2": ("--personas-file", _pairs(**{**PAIR, "sign": 2}), "field sign"),
    "persona sign true": ("--personas-file", _pairs(**{**PAIR, "sign": True}), "field sign"),
    "persona trait unknown": ("--personas-file", _pairs(**{**PAIR, "trait": "Honesty"}), "field trait"),
    "persona pos an integer": ("--personas-file", _pairs(**{**PAIR, "pos": 4}), "field pos"),
    "persona without neg": (
        "--personas-file",
        _pairs(**{k: v for k, v in PAIR.items() if k != "neg"}),
        "'odd': missing field 'neg'",
    ),
    "personas not UTF-8": ("--personas-file", b'{"odd": {"pos": "\xfe"}}', "is not UTF-8"),
    "personas not JSON": ("--personas-file", b'{"odd": ', "not valid JSON"),
}


@pytest.mark.parametrize("flag_, content, needle", DATA.values(), ids=DATA.keys())
def test_data_files(capsys, tmp_path, monkeypatch, flag_, content, needle):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    extra = ["--persona", "odd"] if flag_ == "--personas-file" else []
    refused(capsys, tmp_path, ["--fast-dev-run", "--out-dir", "out", flag_, str(path), *extra],
            needle.format(f=path))  # fmt: skip


def _dir_not_file(tmp):
    (tmp / "adir").mkdir()
    return ["--contexts-file", str(tmp / "adir")], "adir"


def _loop(tmp):
    return ["--contexts-file", _link_loop(tmp, "loop")], "loop"


def _missing(tmp):
    return ["--prompts-file", str(tmp / "nope.jsonl")], "nope.jsonl: no such file"


@pytest.mark.parametrize("make", [_dir_not_file, _loop, _missing], ids=["a directory", "a symlink loop", "missing"])
def test_data_paths(capsys, tmp_path, monkeypatch, make):
    monkeypatch.chdir(tmp_path)
    args, needle = make(tmp_path)
    refused(capsys, tmp_path, ["--fast-dev-run", "--out-dir", "out", *args], needle)


# ---------------------------------------------------------------- model files


def _model_file(name: str, content: bytes):
    def make(tmp):
        (tmp / name).write_bytes(content)
        return str(tmp / name)

    return make


def _model_dir(files: dict[str, bytes]):
    def make(tmp):
        d = tmp / "ckpt"
        d.mkdir()
        for name, content in files.items():
            (d / name).write_bytes(content)
        return str(d)

    return make


MODELS = {
    "random bytes as a GGUF": (_model_file("m.gguf", random.Random(0).randbytes(4096)), "m.gguf"),
    "an empty GGUF": (_model_file("m.gguf", b""), "m.gguf"),
    "a GGUF of the wrong version": (_model_file("m.gguf", b"GGUF\xff\xff\xff\xff" + b"\0" * 64), "m.gguf"),
    "a text file": (_model_file("notes.txt", b"hello"), "notes.txt"),
    "safetensors without a config": (_model_file("w.safetensors", b"\x08\0\0\0\0\0\0\0{}      "), "w.safetensors"),
    "an empty directory": (_model_dir({}), "ckpt"),
    "config.json a list": (_model_dir({"config.json": b"[]"}), "ckpt"),
    "config.json of an unknown model": (_model_dir({"config.json": b'{"model_type": "no_such_arch"}'}), "ckpt"),
    "config.json without weights": (
        _model_dir({"config.json": json.dumps({"model_type": "llama", "hidden_size": 8}).encode()}),
        "ckpt",
    ),  # fmt: skip
    "config.json not UTF-8": (_model_dir({"config.json": b'{"model_type": "\xff"}'}), "ckpt"),
    "a symlink loop": (lambda tmp: _link_loop(tmp, "m.gguf"), "m.gguf"),
}


@pytest.mark.parametrize("make, needle", MODELS.values(), ids=MODELS.keys())
def test_model_files(capsys, tmp_path, monkeypatch, make, needle):
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, ["--fast-dev-run", "--out-dir", "out", "--model", make(tmp_path)], needle)


# ---------------------------------------------------------------- paths: out-dir, run name, resume


def _out(path):
    return lambda tmp: ["--out-dir", path(tmp) if callable(path) else path]


def _out_under_file(tmp):
    (tmp / "afile").write_text("x")
    return ["--out-dir", str(tmp / "afile" / "sub")]


def _taken(tmp):
    (tmp / "out" / "taken").mkdir(parents=True)
    return ["--out-dir", "out", "--run-name", "taken"]


def _name(name):
    return lambda tmp: ["--out-dir", "out", "--run-name", name]


def _resume(make):
    return lambda tmp: ["--resume", make(tmp)]


def _resume_file(tmp):
    (tmp / "f").write_text("{}")
    return str(tmp / "f")


def _resume_empty(tmp):
    (tmp / "e").mkdir()
    return str(tmp / "e")


PATHS = {
    "out-dir a symlink loop": (_out(lambda t: _link_loop(t, "o")), "is it a symlink loop?"),
    "out-dir not UTF-8": (_out(lambda t: _bytes(str(t / "o"))), "has bytes that are not UTF-8"),
    "out-dir with a newline": (_out(lambda t: str(t / "o\nx")), "holds a control character"),
    "out-dir with an escape": (_out(lambda t: str(t / "o\x1b[2J")), "holds a control character"),
    "out-dir under a file": (_out_under_file, "cannot write there"),
    "out-dir /dev/null": (_out("/dev/null"), "a kernel pseudo-filesystem"),
    "out-dir in /sys": (_out("/sys/steer_heal"), "inside /sys"),
    "run name with a newline": (_name("a\n"), "run name 'a\\n' must be one path component"),
    "run name with a slash": (_name("a/b"), "must be one path component"),
    "run name '.'": (_name("."), "must be one path component"),
    "run name hidden": (_name(".hidden"), "must be one path component"),
    "run name of 300 characters": (_name("a" * 300), "must be one path component"),
    "run name with a space": (_name("my run"), "must be one path component"),
    "run name not UTF-8": (_name(_bytes("a")), "not UTF-8"),
    "run name taken": (_taken, "already exists; pass another --run-name or --resume"),
    "resume a missing directory": (_resume(lambda t: str(t / "nowhere")), "not a steer_heal run directory"),
    "resume a file": (_resume(_resume_file), "not a steer_heal run directory"),
    "resume an empty directory": (_resume(_resume_empty), "not a steer_heal run directory"),
    "resume a symlink loop": (_resume(lambda t: _link_loop(t, "r")), "is it a symlink loop?"),
    "resume not UTF-8": (_resume(lambda t: _bytes(str(t / "r"))), "not UTF-8"),
}


@pytest.mark.parametrize("make, needle", PATHS.values(), ids=PATHS.keys())
def test_paths(capsys, tmp_path, monkeypatch, make, needle):
    monkeypatch.chdir(tmp_path)
    args = make(tmp_path)
    refused(capsys, tmp_path, ["--fast-dev-run", *args] if "--resume" not in args else args, needle)


# ---------------------------------------------------------------- faults: killed at each stage, then resumed


class Killed(BaseException):
    """What a SIGKILL does to the run, in-process: it stops where it is; no handler of ours sees it (a
    BaseException that is neither KeyboardInterrupt nor an Exception), so no stop event is written."""


def _kill_on(obj, name: str, call: int = 1):
    """Patch obj.name to die on its `call`-th call (counting from 1)."""
    real, n = getattr(obj, name), [0]

    def dying(*a, **kw):
        n[0] += 1
        if n[0] == call:
            raise Killed(f"{name} call {call}")
        return real(*a, **kw)

    return obj, name, dying


def _kill_at_done(recorder):
    real = recorder.atomic_write_text

    def dying(path, text):
        if Path(path).name == "DONE":  # the round event is in events.jsonl; the marker never lands
            raise Killed("DONE")
        return real(path, text)

    return recorder, "atomic_write_text", dying


def _kill_table():
    from steer_heal import recorder, stages, student
    from steer_heal.recorder import Recorder
    from steer_heal.session import Session

    return {  # where -> a patch (obj, name, dying); built per test, so each counts its own calls
        "base eval": lambda: _kill_on(Session, "evaluate", 1),
        "filter calibration": lambda: _kill_on(stages, "filter_threshold"),
        "base collapse signals": lambda: _kill_on(stages, "collapse_signals", 1),
        "extract": lambda: _kill_on(Session, "teacher", 1),
        "generate and filter": lambda: _kill_on(stages, "collect"),
        "steered eval": lambda: _kill_on(Session, "evaluate", 2),
        "random null": lambda: _kill_on(null, "random_null"),
        "heal data": lambda: _kill_on(stages, "heal_data"),
        "heal": lambda: _kill_on(stages, "heal"),
        "bake": lambda: _kill_on(student.Student, "bake"),
        "healed eval": lambda: _kill_on(Session, "evaluate", 3),
        "healed collapse signals": lambda: _kill_on(stages, "collapse_signals", 2),
        "round record": lambda: _kill_on(Recorder, "round"),
        "DONE marker": lambda: _kill_at_done(recorder),
        "round 1 extract": lambda: _kill_on(Session, "teacher", 2),
        "round 1 heal": lambda: _kill_on(stages, "heal", 2),
    }


KILLS = _kill_table()
TIMING = {"ts", "seconds", "peak_mib"}  # how long it took differs between runs; what it computed must not


def numbers(root: Path, rounds: int = 1000) -> dict:
    """What a run computed in its first `rounds` rounds: the round records and every eval's metrics (the
    base's too), less the timings."""
    from steer_heal import events

    def keep(kind):
        recs = [x for x in events.read(root, kind) if x["round"] < rounds]
        return sorted(json.dumps({k: v for k, v in x.items() if k not in TIMING}, sort_keys=True) for x in recs)

    return {"round": keep("round"), "eval": keep("eval")}


@pytest.mark.parametrize("where", KILLS)
def test_a_run_killed_at_each_stage_resumes_to_the_same_numbers(capsys, tmp_path, monkeypatch, fast_run, where):
    from tests.conftest import fast_args

    rounds = 2 if where.startswith("round 1") else 1  # a kill in round 0 needs no round 1 to show its harm
    monkeypatch.setattr(*KILLS[where]())
    with pytest.raises(Killed):
        main(fast_args(tmp_path, "a", rounds=rounds))  # fast_run's flags and name: its numbers are the reference
    monkeypatch.undo()
    root = tmp_path / "a"
    assert main(["--resume", str(root)]) == 0, capsys.readouterr().err[-2000:]
    assert "Traceback" not in capsys.readouterr().err
    got, want = numbers(root), numbers(fast_run / "a", rounds)
    assert len(got["round"]) == rounds and got == want


# ---------------------------------------------------------------- scripts: the same contract as the run


def _script(name: str):
    import importlib

    from steer_heal.cli import command

    mod = importlib.import_module(f"scripts.{name}")
    return lambda argv: command(mod.main, argv)


def _not_utf8_ledger(tmp):
    (tmp / "results.jsonl").write_bytes(b'{"run": "a\xff"}\n')
    return ["--ledger", str(tmp / "results.jsonl")]


def _run_is_a_file(tmp):
    (tmp / "run").write_text("x")
    return [str(tmp / "run")]


SCRIPTS = {
    "screen: a band of one value": ("diag_screen", ["--personas", "warm_vs_cold", "--bands", "0.5"], "--bands"),
    "screen: a reversed band": ("diag_screen", ["--personas", "warm_vs_cold", "--bands", "0.6,0.4"], "--bands"),
    "screen: a NaN dose": (
        "diag_screen",
        ["--personas", "warm_vs_cold", "--bands", "0.4,0.6", "--doses", "nan"],
        "argument --doses: nan must be a finite number",
    ),  # fmt: skip
    "screen: negative null count": (
        "diag_screen",
        ["--personas", "warm_vs_cold", "--bands", "0.4,0.6", "--n-null", "-1"],
        "--n-null",
    ),  # fmt: skip
    "screen: no personas": ("diag_screen", ["--bands", "0.4,0.6"], "--personas"),
    "frontier_seeds: a missing run": ("frontier_seeds", ["/no/such/run"], "/no/such/run"),
    "frontier: a missing run": ("diag_frontier", ["/no/such/run"], "/no/such/run"),
    "frontier: a NaN strength": ("diag_frontier", ["/no/such/run", "--cs", "nan"], "argument --cs: nan"),
    "frontier: an unknown axis": ("diag_frontier", ["/no/such/run", "--x", "vibes"], "argument --x"),
    "results: a ledger not UTF-8": ("results", _not_utf8_ledger, "is not UTF-8"),
    "plot_run: a missing run": ("plot_run", ["/no/such/run"], "/no/such/run"),
    "plot_run: a file for a run": ("plot_run", _run_is_a_file, "run"),
    "format: an unknown format": ("diag_format", ["--formats", "nope"], "argument --formats"),
    "collapse: a NaN threshold": ("diag_collapse", ["/no/such/run", "--coh-drop", "nan"], "--coh-drop"),
    "csweep: a negative strength": ("diag_csweep", ["--cs", "-1", "--fast-dev-run"], "argument --cs"),
    "bench: an unknown part": ("bench", ["--only", "nope"], "argument --only"),
    "barrier: a NaN lambda": ("diag_barrier", ["/no/such/run", "--lams", "nan"], "argument --lams"),
    "kl_agg: a word for a count": ("diag_kl_agg", ["--positions", "abc"], "argument --positions"),
    "stages: a file for a run": ("diag_stages", _run_is_a_file, "run"),
    "null: a zero count": ("diag_null", ["/no/such/run", "--n-null", "0"], "argument --n-null"),
    "prompt baseline: an unknown flag": ("diag_prompt_baseline", ["/no/such/run", "--frob"], "--frob"),
    "score_completions: a missing file": ("score_completions", ["/no/such.jsonl", "--fast-dev-run"], "/no/such.jsonl"),
}


@pytest.mark.parametrize("script, args, needle", SCRIPTS.values(), ids=SCRIPTS.keys())
def test_scripts(capsys, tmp_path, monkeypatch, script, args, needle):
    monkeypatch.chdir(tmp_path)
    argv = args(tmp_path) if callable(args) else args
    refused(capsys, tmp_path, argv, needle, entry=_script(script))


def test_a_real_sigkill_mid_heal_resumes_to_the_same_numbers(capsys, tmp_path, fast_run):
    """The one fault no handler can see, sent to a real process: whatever it leaves (a torn events line, a
    half-written temporary) the resume clears, and round 0 comes out as the uninterrupted run's."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import fast_args

    root = tmp_path / "a"
    p = subprocess.Popen([sys.executable, "-m", "steer_heal.run", *fast_args(tmp_path, "a", rounds=1)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:  # wait for round 0's first heal step on disk
        log = root / "events.jsonl"
        if log.is_file() and '"stage": "heal_step"' in log.read_text(errors="replace"):
            break
        time.sleep(0.02)
    assert p.poll() is None, f"the run ended (exit {p.returncode}) before its heal started"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert not (root / "rounds" / "r00" / "DONE").exists()
    assert main(["--resume", str(root)]) == 0, capsys.readouterr().err[-2000:]
    assert not list(root.rglob(".*.tmp*"))
    assert numbers(root) == numbers(fast_run / "a", 1)

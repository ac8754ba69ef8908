"""The events.jsonl contract and atomic writes."""

from __future__ import annotations

import json
import math

import pytest

from steer_heal import events
from steer_heal.errors import UserError
from steer_heal.rundir import atomic_write_json, safe_name


def test_non_finite_floats_become_null_and_fields_are_present(tmp_path):
    ev = events.Events(tmp_path / "events.jsonl")
    ev.emit("eval", -1, model="base", x=math.nan, y=[1.0, math.inf], z={"a": -math.inf})
    (rec,) = events.read(tmp_path)
    assert rec["schema"] == events.SCHEMA and rec["stage"] == "eval" and rec["round"] == -1 and rec["ts"]
    assert rec["x"] is None and rec["y"] == [1.0, None] and rec["z"] == {"a": None}
    with pytest.raises(ValueError, match="unknown event stage 'evaluate'"):
        ev.emit("evaluate", 0)


def test_reader_rejects_an_unknown_major_version(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text(json.dumps({"schema": "2.0", "ts": "t", "stage": "eval", "round": 0}) + "\n")
    with pytest.raises(UserError, match=rf"schema '2.0' is not readable by this version \(reads {events.SCHEMA}\)"):
        events.read(p)
    # a newer minor version of the same major reads fine (fields are only ever added within a major)
    p.write_text(json.dumps({"schema": "1.9", "ts": "t", "stage": "eval", "round": 0}) + "\n")
    assert events.read(p)[0]["stage"] == "eval"


def test_reader_skips_only_a_torn_last_line(tmp_path):
    ev = events.Events(tmp_path / "events.jsonl")
    ev.emit("round", 0)
    with (tmp_path / "events.jsonl").open("a") as f:
        f.write('{"schema": "1.0", "st')  # a crash mid-write
    assert [r["stage"] for r in events.read(tmp_path)] == ["round"]
    (tmp_path / "events.jsonl").write_text(
        '{"broken\n' + json.dumps({"schema": "1.0", "stage": "x", "round": 0}) + "\n"
    )
    with pytest.raises(UserError, match="events.jsonl:1: corrupt event line"):
        events.read(tmp_path)


def test_a_torn_last_line_is_cut_before_the_next_record_so_it_never_sits_mid_file(tmp_path):
    path = tmp_path / "events.jsonl"
    ev = events.Events(path)
    ev.emit("round", 0)
    with path.open("a") as f:
        f.write("xx")  # what a kill leaves: a record cut short (here not even its opening bytes)
    assert [r["stage"] for r in events.read(tmp_path)] == ["round"]
    ev.emit("resume", 1, completed=[0])
    assert [json.loads(x)["stage"] for x in path.read_text().splitlines()] == ["round", "resume"]
    with path.open("a") as f:
        f.write(json.dumps({"schema": events.SCHEMA, "stage": "stop", "round": 1}))  # whole, only its newline lost
    ev.emit("summary", -1)
    assert [r["stage"] for r in events.read(tmp_path, raw=True)] == ["round", "resume", "stop", "summary"]


@pytest.mark.parametrize("junk", ["xx\n", "xx\n{}\n"], ids=["last line, whole", "mid-file"])
def test_junk_that_no_crash_could_write_is_refused_wherever_it_sits(tmp_path, junk):
    path = tmp_path / "events.jsonl"
    events.Events(path).emit("round", 0)
    with path.open("a") as f:
        f.write(junk)
    with pytest.raises(UserError, match=r"events.jsonl:2: corrupt event line .*repair or delete this line"):
        events.read(tmp_path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a" / "c.json", {"v": math.nan})
    assert json.loads((tmp_path / "a" / "c.json").read_text()) == {"v": None}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["c.json"]


@pytest.mark.parametrize("name", ["../up", "a/b", "/abs", "..", ""])
def test_run_names_cannot_escape_the_out_dir(name):
    with pytest.raises(UserError, match="run name"):
        safe_name(name)


def test_a_record_after_a_torn_write_starts_on_its_own_line(tmp_path):
    """A full disk can cut a line short; the next record (e.g. a resume marker) must not be glued onto it."""
    ev = events.Events(tmp_path / "events.jsonl")
    ev.emit("round", 0)
    with (tmp_path / "events.jsonl").open("a") as f:
        f.write('{"schema": "1.2", "ts": "t", "stage": "ro')  # torn mid-record
    ev.emit("resume", 1, completed=[0])
    ev.emit("round", 1)
    assert [(r["stage"], r["round"]) for r in events.read(tmp_path)] == [("round", 0), ("resume", 1), ("round", 1)]


def test_remove_temps_deletes_half_written_files_and_restores_a_set_aside_directory(tmp_path):
    from steer_heal.rundir import RunDir

    (tmp_path / ".export.tmp999999").mkdir()  # a killed export
    (tmp_path / ".events.jsonl.tmp999998").write_text("x")
    kept = tmp_path / "rounds" / "r00"
    (kept / ".adapter.old999997").mkdir(parents=True)  # killed between setting the old adapter aside and the swap
    (kept / ".adapter.old999997" / "w").write_text("weights")
    assert RunDir(tmp_path).remove_temps() == 3
    assert not (tmp_path / ".export.tmp999999").exists() and not (tmp_path / ".events.jsonl.tmp999998").exists()
    assert (kept / "adapter" / "w").read_text() == "weights"

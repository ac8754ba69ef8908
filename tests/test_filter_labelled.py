"""The shipped labelled filter set (data/filter_labelled.jsonl: 48 coherent answers, 48 degenerate texts of
the kinds seen in steered completions) is separated perfectly by scripts/score_completions.py on the
default model, with the threshold calibrated as a run calibrates it."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "filter_labelled.jsonl"


def test_labelled_set_is_separated_on_the_default_model():
    p = subprocess.run(
        [sys.executable, "scripts/score_completions.py", str(DATA)], capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    assert len(rows) == 96 and collections.Counter(r["label"] for r in rows) == {"coherent": 48, "degenerate": 48}
    wrong = [
        (r["id"], r["reason"], round(r["tail_ppl"] or 0, 1)) for r in rows if r["keep"] != (r["label"] == "coherent")
    ]
    assert wrong == []
    # each degenerate kind is caught by the check meant for it, not by accident
    reasons = collections.defaultdict(set)
    for r in rows:
        if r["label"] == "degenerate":
            reasons[r["kind"]].add(r["reason"])
    assert reasons["made_up_soup"] == {"loop"} and reasons["narration"] == {"narration"}
    assert reasons["word_salad"] == {"ppl"} and reasons["language_drift"] <= {"ppl", "drift"}

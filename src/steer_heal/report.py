"""Reports built from events.jsonl alone: the summary table, the filter (Q0) and collapse tables,
greedy samples, summary.md and trajectory.png. `build(run_dir)` is what the run calls at the end and
what `scripts/plot_run.py` calls on an interrupted run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from steer_heal.figures import trajectory_png
from steer_heal.records import COLLAPSE_KEYS, RunInfo, run_verdict, separation_line
from steer_heal.rundir import atomic_write_text
from steer_heal.stats import Estimate


def fmt(x, spec=".3f"):
    return "" if x is None else format(x, spec)


def with_ci(x, ci, spec="+.3f") -> str:
    """A round record's value with its [lo, hi] (stats.Estimate.text)."""
    return Estimate.pair(x, ci).text(spec)


def summary_rows(info: RunInfo) -> list[dict]:
    """The base row, then each round's steered and healed rows: the trait shift raw (dTrait), calibrated by
    the content-free prior (dCal) and item-discriminative (dDisc: target-labelled vignettes minus the rest)
    with paired-bootstrap 95 % intervals, retain, slope, the capability tax (ref_nll) and, for healed rows,
    where the raw and discriminative shifts fall against the random null (share of random directions beaten)."""
    tk, base = info.trait_key, info.base
    rows = []
    if base:
        rows.append({"round": "base", "model": "base", tk: fmt(base.get(tk)), "coherence": fmt(base.get("coherence")),
                     "ref_nll": fmt(base.get("ref_nll"))})  # fmt: skip
    for r in info.rounds:
        for m in ("steered", "healed"):
            steered = m == "steered"
            rows.append(
                {
                    "round": r.round,
                    "model": m,
                    tk: fmt(r.get(f"{m}_trait")),
                    "coherence": fmt(r.get(f"{m}_coh")),
                    "ref_nll": fmt(r.get(f"{m}_ref_nll")),
                    "dTrait [95% CI]": with_ci(r.get(f"dtrait_{m}"), r.ci.get(f"dtrait_{m}")),
                    "dCal [95% CI]": with_ci(r.get(f"dtrait_cal_{m}"), r.ci.get(f"dtrait_cal_{m}")),
                    "dDisc [95% CI]": with_ci(r.get(f"dtrait_disc_{m}"), r.ci.get(f"dtrait_disc_{m}")),
                    "dCoh [95% CI]": with_ci(r.get(f"dcoh_{m}"), r.ci.get(f"dcoh_{m}")),
                    "retain": "" if steered else with_ci(r.get("retain"), r.ci.get("retain"), ".2f"),
                    "slope": fmt(r.get(f"slope_{m}"), ".1f"),
                    "null_pct": "" if steered else fmt(r.get("null_pct"), ".2f"),
                    "null_pct_disc": "" if steered else fmt(r.get("null_pct_disc"), ".2f"),
                    "kappa": fmt(r.get("kappa"), ".2f") if steered else "",
                    "kept": f"{r.get('n_kept')}/{r.get('n_generated')}" if steered else "",
                    "cos_v0": fmt(r.get("cos_v0"), ".2f") if steered else "",
                    "cos_stu": "" if steered else fmt(r.get("cos_student_teacher"), ".2f"),
                }
            )
    return rows


def collapse_rows(info: RunInfo) -> list[dict]:
    """Per-model collapse signals next to coherence: the base row, then each round's healed student."""
    base = info.base or {}
    done = {r.round: r for r in info.rounds}
    out = []
    for r, c in sorted(info.collapse.items()):
        if r >= 0 and r not in done:
            continue  # a round that did not finish has no coherence to compare with
        rec = done.get(r)
        row = {"round": "base" if r < 0 else r, "coherence": base.get("coherence") if r < 0 else rec.get("healed_coh")}
        row |= {k: c.get(k) for k in COLLAPSE_KEYS}
        row["skipped"] = "" if r < 0 else f"{rec.get('barrier_skipped') or 0}/{rec.get('steps_skipped') or 0}"
        out.append(row)
    return out


def q0_rows(info: RunInfo) -> list[dict]:
    """The filter's Q0 table of every round: per applied strength, perplexity and kept fraction."""
    return [{"round": f["round"], **row} for f in info.filters for row in f.get("q0", [])]


def samples_md(run_dir: Path, width: int = 240) -> str:
    """Steered and healed completions side by side for the fixed sample prompts of each round."""
    out = []
    for f in sorted(Path(run_dir).glob("rounds/r*/samples.json")):
        rows = json.loads(f.read_text(encoding="utf-8"))
        cell = lambda t: " ".join(t.split())[:width].replace("|", "/")  # noqa: E731
        table = [
            {"prompt": cell(r["prompt"])[:80], "steered": cell(r["steered"]), "healed": cell(r["healed"])} for r in rows
        ]
        out.append(f"### {f.parent.name}\n\n" + tabulate(table, headers="keys", tablefmt="github"))
    return "\n\n".join(out) + "\n"


@dataclass
class Report:
    table: str
    q0: str
    collapse: str
    verdict: str
    info: RunInfo
    instrument: str | None = None  # records.separation_line: does the eval discriminate on the base model?

    def text(self) -> str:
        """What the run prints at the end."""
        return f"{self.table}\n\nfilter (Q0):\n{self.q0}\n\ncollapse signals:\n{self.collapse}\n"


def build(run_dir: Path) -> Report:
    """Write summary.md and trajectory.png from events.jsonl; return the tables and the verdict."""
    run_dir = Path(run_dir)
    info = RunInfo.read(run_dir)
    v, sep = run_verdict(info), separation_line(info)
    inst = f"Instrument: {sep}.\n\n" if sep else ""
    table = tabulate(summary_rows(info), headers="keys", tablefmt="github")
    q0 = tabulate(q0_rows(info), headers="keys", tablefmt="github", floatfmt=".3g", missingval="0")
    crows = collapse_rows(info)
    col = tabulate(crows, headers="keys", tablefmt="github", floatfmt=".3f", missingval="")
    trajectory_png(info, crows, run_dir / "trajectory.png")
    md = (
        f"# {run_dir.name}\n\n{v}\n\n{inst}## Rounds\n\n{table}\n\n## Filter (Q0)\n\n{q0}\n\n"
        f"## Collapse signals (unsteered; skipped = barrier / micro-batches dropped by the heal safety check)"
        f"\n\n{col}\n\n"
        "![trajectory](trajectory.png)\n\n## Samples (greedy; steered before heal, healed after bake)\n\n"
        + samples_md(run_dir)
    )
    atomic_write_text(run_dir / "summary.md", md)
    return Report(table=table, q0=q0, collapse=col, verdict=v, info=info, instrument=sep)

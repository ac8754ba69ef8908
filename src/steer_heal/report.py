"""Reports built from events.jsonl alone: per-round deltas, summary table, trajectory figure, verdict,
and the results ledger. `build(run_dir)` is what the run calls at the end and what
`scripts/plot_run.py` calls on an interrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tabulate import tabulate

from steer_heal import events as ev
from steer_heal.rundir import atomic_write_text

SLOPE_MIN_DTRAIT = 0.05  # nats; below this the slope is noise and is left blank


def isfinite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def deltas(base: dict, steered: dict | None, healed: dict | None, trait_key: str) -> dict:
    """dTrait / dCoh against base, retain = dTrait(healed) / dTrait(steered), slope = 100 dCoh / dTrait."""

    def d(m, k):
        return m[k] - base[k] if m and isfinite(m.get(k)) and isfinite(base.get(k)) else None

    out = {
        "dtrait_steered": d(steered, trait_key),
        "dtrait_healed": d(healed, trait_key),
        "dcoh_steered": d(steered, "coherence"),
        "dcoh_healed": d(healed, "coherence"),
    }
    ds, dh = out["dtrait_steered"], out["dtrait_healed"]
    out["retain"] = dh / ds if ds is not None and dh is not None and abs(ds) >= SLOPE_MIN_DTRAIT else None
    out["slope_healed"] = slope(dh, out["dcoh_healed"])
    out["slope_steered"] = slope(ds, out["dcoh_steered"])
    return out


def slope(dtrait, dcoh):
    """100 * dCoh / dTrait: coherence points lost per nat of trait; None when |dTrait| < 0.05 nats."""
    if dtrait is None or dcoh is None or abs(dtrait) < SLOPE_MIN_DTRAIT:
        return None
    return 100 * dcoh / dtrait


def verdict(
    base: dict, healed: dict | None, trait_key: str, sign: int, coh_floor: float, stop_reason: str | None
) -> str:
    """One line. Finiteness and the absolute coherence floor are checked before any trait ratio: a
    collapsed model sends the trait to -inf, which a ratio-only verdict would score as success."""
    if healed is None:
        return f"FAIL: no healed round finished ({stop_reason or 'stopped early'})"
    t, c = healed.get(trait_key), healed.get("coherence")
    if not (isfinite(t) and isfinite(c)):
        return f"FAIL: non-finite metrics ({trait_key}={t}, coherence={c})"
    if c < coh_floor:
        return f"FAIL: coherence {c:.3f} below the floor {coh_floor:.2f} ({trait_key} {t:+.3f})"
    dt = t - base[trait_key]
    if sign * dt < SLOPE_MIN_DTRAIT:
        return (
            f"NULL: {trait_key} moved {dt:+.3f} nats vs base (expected sign {sign:+d}, |d| >= {SLOPE_MIN_DTRAIT}); "
            f"coherence {c:.3f}"
        )
    tail = f"; stopped: {stop_reason}" if stop_reason else ""
    return (
        f"PASS: {trait_key} {dt:+.3f} nats vs base in the expected direction, coherence {c:.3f} "
        f">= floor {coh_floor:.2f}{tail}"
    )


def collect(run_dir: Path) -> dict:
    """Everything the report needs, from events.jsonl."""
    recs = ev.read(Path(run_dir) / "events.jsonl")
    cfg = next((r for r in recs if r["stage"] == "config"), {})
    base = next((r for r in recs if r["stage"] == "eval" and r.get("model") == "base"), None)
    rounds = [r for r in recs if r["stage"] == "round"]
    stops = [r for r in recs if r["stage"] == "stop"]
    filters = [r for r in recs if r["stage"] == "filter"]
    col = {r["round"]: r for r in recs if r["stage"] == "collapse"}  # -1 = base; a re-run round replaces
    return {
        "config": cfg,
        "base": base,
        "rounds": rounds,
        "stop": stops[-1] if stops else None,
        "filters": filters,
        "collapse": col,
    }


def fmt(x, spec=".3f"):
    return "" if x is None else format(x, spec)


def summary_rows(info: dict) -> list[dict]:
    tk = info["config"].get("trait_key", "auth_nats")
    base = info["base"]
    rows = (
        [{"round": "base", "model": "base", tk: fmt(base.get(tk)), "coherence": fmt(base.get("coherence"))}]
        if base
        else []
    )
    for r in info["rounds"]:
        for m in ("steered", "healed"):
            rows.append(
                {
                    "round": r["round"],
                    "model": m,
                    tk: fmt(r.get(f"{m}_trait")),
                    "coherence": fmt(r.get(f"{m}_coh")),
                    "dTrait": fmt(r.get(f"dtrait_{m}"), "+.3f"),
                    "dCoh": fmt(r.get(f"dcoh_{m}"), "+.3f"),
                    "retain": fmt(r.get("retain"), ".2f") if m == "healed" else "",
                    "slope": fmt(r.get(f"slope_{m}"), ".1f"),
                    "kappa": fmt(r.get("kappa"), ".2f") if m == "steered" else "",
                    "kept": f"{r.get('n_kept')}/{r.get('n_generated')}" if m == "steered" else "",
                    "cos_v0": fmt(r.get("cos_v0"), ".2f") if m == "steered" else "",
                    "cos_stu": fmt(r.get("cos_student_teacher"), ".2f") if m == "healed" else "",
                }
            )
    return rows


COLLAPSE_COLS = ("pr_band", "pr_final", "erank_band", "erank_final", "entropy_mean", "entropy_p5", "amp")


def collapse_rows(info: dict) -> list[dict]:
    """Per-model collapse signals next to coherence: the base row, then each round's healed student."""
    col, base = info.get("collapse", {}), info["base"] or {}
    done = {r["round"]: r for r in info["rounds"]}
    out = []
    for r, c in sorted(col.items()):
        if r >= 0 and r not in done:
            continue  # a round that did not finish has no coherence to compare with
        rec = done.get(r, {})
        row = {"round": "base" if r < 0 else r, "coherence": base.get("coherence") if r < 0 else rec.get("healed_coh")}
        row |= {k: c.get(k) for k in COLLAPSE_COLS}
        row["skipped"] = "" if r < 0 else f"{rec.get('barrier_skipped', 0)}/{rec.get('steps_skipped', 0)}"
        out.append(row)
    return out


def q0_rows(info: dict) -> list[dict]:
    out = []
    for f in info["filters"]:
        for row in f.get("q0", []):
            out.append({"round": f["round"], **row})
    return out


def trajectory_png(info: dict, path: Path, coh_floor: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tk = info["config"].get("trait_key", "auth_nats")
    base, rounds = info["base"], info["rounds"]
    rs = [r["round"] for r in rounds]
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    for m, style in (("steered", "o--"), ("healed", "s-")):
        ax[0].plot(rs, [r.get(f"{m}_trait") for r in rounds], style, label=m)
        ax[1].plot(rs, [r.get(f"{m}_coh") for r in rounds], style, label=m)
    if base:
        ax[0].axhline(base[tk], color="gray", ls=":", label="base")
        ax[1].axhline(base["coherence"], color="gray", ls=":", label="base")
    ax[1].axhline(coh_floor, color="red", lw=0.8, label="floor")
    ax[0].set(xlabel="round", ylabel=f"{tk} (nats)", title="trait vs round")
    ax[1].set(xlabel="round", ylabel="coherence p_ans_any", title="coherence vs round")
    # Trait-coherence map: base, then per round steered -> healed, arrows from one round's healed to the next.
    if base:
        ax[2].scatter([base[tk]], [base["coherence"]], c="gray", marker="*", s=160, label="base", zorder=3)
    prev = (base[tk], base["coherence"]) if base else None
    for r in rounds:
        s = (r.get("steered_trait"), r.get("steered_coh"))
        h = (r.get("healed_trait"), r.get("healed_coh"))
        if None not in s:
            ax[2].scatter(*s, c="tab:blue", marker="o")
        if None not in h:
            ax[2].scatter(*h, c="tab:orange", marker="s")
            ax[2].annotate(f"r{r['round']}", h, fontsize=8, xytext=(3, 3), textcoords="offset points")
            if prev is not None and None not in prev:
                ax[2].annotate("", h, prev, arrowprops=dict(arrowstyle="->", color="tab:orange", alpha=0.7))
            prev = h
    ax[2].scatter([], [], c="tab:blue", marker="o", label="steered")
    ax[2].scatter([], [], c="tab:orange", marker="s", label="healed")
    ax[2].set(xlabel=f"{tk} (nats)", ylabel="coherence", title="trait vs coherence")
    # Collapse precursors, each relative to the base model's value (1 = unchanged), next to coherence.
    crow = collapse_rows(info)
    if crow and crow[0]["round"] == "base":
        b, rest = crow[0], crow[1:]
        for k in ("coherence", "pr_band", "pr_final", "entropy_mean", "entropy_p5", "amp"):
            if isfinite(b.get(k)) and b[k] != 0 and any(isfinite(x.get(k)) for x in rest):
                ys = [x[k] / b[k] if isfinite(x.get(k)) else None for x in rest]
                ax[3].plot([-1] + [x["round"] for x in rest], [1.0, *ys], "k-" if k == "coherence" else "o-", label=k)
        ax[3].axhline(1.0, color="gray", ls=":")
    ax[3].set(xlabel="round (-1 = base)", ylabel="value / base", title="collapse precursors")
    from matplotlib.ticker import MaxNLocator

    for a in (ax[0], ax[1], ax[3]):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(Path(path).parent.name, fontsize=9)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def build(run_dir: Path) -> dict:
    """Write summary.md and trajectory.png from events.jsonl; return {table, q0, verdict, ...}."""
    run_dir = Path(run_dir)
    info = collect(run_dir)
    cfg = info["config"]
    tk, sign, floor = cfg.get("trait_key", "auth_nats"), cfg.get("trait_sign", -1), cfg.get("coh_floor", 0.0)
    healed = None
    if info["rounds"]:
        last = info["rounds"][-1]
        healed = {tk: last.get("healed_trait"), "coherence": last.get("healed_coh")}
    reason = info["stop"].get("reason") if info["stop"] else None
    v = verdict(info["base"], healed, tk, sign, floor, reason) if info["base"] else "FAIL: no base eval recorded"
    table = tabulate(summary_rows(info), headers="keys", tablefmt="github")
    q0 = tabulate(q0_rows(info), headers="keys", tablefmt="github", floatfmt=".3g", missingval="0")
    col = tabulate(collapse_rows(info), headers="keys", tablefmt="github", floatfmt=".3f", missingval="")
    trajectory_png(info, run_dir / "trajectory.png", floor)
    md = (
        f"# {run_dir.name}\n\n{v}\n\n## Rounds\n\n{table}\n\n## Filter (Q0)\n\n{q0}\n\n"
        f"## Collapse signals (unsteered; skipped = barrier / micro-batches dropped by the heal safety check)"
        f"\n\n{col}\n\n"
        "![trajectory](trajectory.png)\n\n## Samples (greedy; steered before heal, healed after bake)\n\n"
        + samples_md(run_dir)
    )
    atomic_write_text(run_dir / "summary.md", md)
    return {"table": table, "q0": q0, "collapse": col, "verdict": v, "info": info}


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


def ledger_row(info: dict, verdict_line: str, run_dir: Path) -> dict:
    cfg = info["config"]
    rounds = info["rounds"]
    tk = cfg.get("trait_key", "auth_nats")
    last = rounds[-1] if rounds else {}
    sign = cfg.get("trait_sign", -1)
    floor = cfg.get("coh_floor", 0.0)
    ok = [
        r
        for r in rounds
        if isfinite(r.get("healed_coh")) and r["healed_coh"] >= floor and isfinite(r.get("dtrait_healed"))
    ]
    best = max(ok, key=lambda r: sign * r["dtrait_healed"]) if ok else {}
    c = cfg.get("config", {})
    heal = c.get("heal", {})
    return {
        "run": run_dir.name,
        "commit": cfg.get("git_commit"),
        "argv": cfg.get("argv"),
        "preset": c.get("preset"),
        "model": c.get("model"),
        "reg": heal.get("reg"),
        "lam": heal.get("lam"),
        "tau": heal.get("tau"),
        "kl_agg": heal.get("kl_agg"),
        "barrier_ref": heal.get("barrier_ref"),
        "seed": c.get("seed"),
        "trait_key": tk,
        "base_trait": (info["base"] or {}).get(tk),
        "base_coh": (info["base"] or {}).get("coherence"),
        "n_rounds_done": len(rounds),
        "final_dtrait": last.get("dtrait_healed"),
        "final_coh": last.get("healed_coh"),
        "final_retain": last.get("retain"),
        "best_round": best.get("round"),
        "best_dtrait": best.get("dtrait_healed"),
        "best_coh": best.get("healed_coh"),
        "verdict": verdict_line,
        "stop": (info["stop"] or {}).get("reason"),
    }


def append_ledger(path: Path, row: dict) -> None:
    """One JSON object per line: columns may change between versions and old rows still read back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(ev.finite(row), ensure_ascii=False) + "\n")


def read_ledger(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

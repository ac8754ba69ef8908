"""The trajectory figure of a run: trait and coherence per round, the trait-coherence map, and the
collapse precursors relative to the base model. Built from a `RunInfo` alone.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from steer_heal.records import RunInfo, isfinite, null_key  # noqa: E402
from steer_heal.rundir import atomic_write  # noqa: E402

PRECURSORS = ("coherence", "pr_band", "pr_final", "entropy_mean", "entropy_p5", "amp")


def _per_round(ax_trait, ax_coh, info: RunInfo) -> None:
    """Trait and coherence against round, steered and healed, with the base and the floor as lines."""
    rs = [r.round for r in info.rounds]
    for m, style in (("steered", "o--"), ("healed", "s-")):
        ax_trait.plot(rs, [r.get(f"{m}_trait") for r in info.rounds], style, label=m)
        ax_coh.plot(rs, [r.get(f"{m}_coh") for r in info.rounds], style, label=m)
    if info.base:
        ax_trait.axhline(info.base[info.trait_key], color="gray", ls=":", label="base")
        ax_coh.axhline(info.base["coherence"], color="gray", ls=":", label="base")
    ax_coh.axhline(info.coh_floor, color="red", lw=0.8, label="floor")
    ax_trait.set(xlabel="round", ylabel=f"{info.trait_key} (nats)", title="trait vs round")
    ax_coh.set(xlabel="round", ylabel="coherence p_ans_any", title="coherence vs round")


def _map(ax, info: RunInfo) -> None:
    """Base, then each round's steered and healed points; arrows join the healed points in round order."""
    tk = info.trait_key
    prev = None
    if info.base:
        prev = (info.base[tk], info.base["coherence"])
        ax.scatter(*prev, c="gray", marker="*", s=160, label="base", zorder=3)
    for r in info.rounds:
        s, h = (r.get("steered_trait"), r.get("steered_coh")), (r.get("healed_trait"), r.get("healed_coh"))
        if None not in s:
            ax.scatter(*s, c="tab:blue", marker="o")
        if None not in h:
            ax.scatter(*h, c="tab:orange", marker="s")
            ax.annotate(f"r{r.round}", h, fontsize=8, xytext=(3, 3), textcoords="offset points")
            if prev is not None and None not in prev:
                ax.annotate("", h, prev, arrowprops=dict(arrowstyle="->", color="tab:orange", alpha=0.7))
            prev = h
    ax.scatter([], [], c="tab:blue", marker="o", label="steered")
    ax.scatter([], [], c="tab:orange", marker="s", label="healed")
    ax.set(xlabel=f"{tk} (nats)", ylabel="coherence", title="trait vs coherence")


def _precursors(ax, rows: list[dict]) -> None:
    """Each collapse signal divided by the base model's value (1 = unchanged), next to coherence."""
    if rows and rows[0]["round"] == "base":
        b, rest = rows[0], rows[1:]
        for k in PRECURSORS:
            if isfinite(b.get(k)) and b[k] != 0 and any(isfinite(x.get(k)) for x in rest):
                ys = [x[k] / b[k] if isfinite(x.get(k)) else None for x in rest]
                ax.plot([-1] + [x["round"] for x in rest], [1.0, *ys], "k-" if k == "coherence" else "o-", label=k)
        ax.axhline(1.0, color="gray", ls=":")
    ax.set(xlabel="round (-1 = base)", ylabel="value / base", title="collapse precursors")


def _shifts(ax, info: RunInfo) -> None:
    """Each round's healed (and steered) shift against base, raw / calibrated / discriminative, with 95 %
    intervals: did the judgement move, or only the answer word's prior?"""
    rs = [r.round for r in info.rounds]
    styles = {"raw": ("raw", "tab:blue"), "cal": ("calibrated", "tab:green"), "disc": ("discriminative", "tab:red")}
    for kind, (name, color) in styles.items():
        key = null_key(kind)  # dtrait, dtrait_cal, dtrait_disc: the round record's stems
        for m, style, dx in (("healed", "s-", 0.0), ("steered", "o:", 0.12)):
            ys = [r.get(f"{key}_{m}") for r in info.rounds]
            if not any(isfinite(y) for y in ys):
                continue
            cis = [r.ci.get(f"{key}_{m}") or [None, None] for r in info.rounds]
            err = [[y - c[0] if isfinite(y) and isfinite(c[0]) else 0 for y, c in zip(ys, cis)],
                   [c[1] - y if isfinite(y) and isfinite(c[1]) else 0 for y, c in zip(ys, cis)]]  # fmt: skip
            ys = [y if isfinite(y) else float("nan") for y in ys]
            ax.errorbar([x + dx for x in rs], ys, yerr=err, fmt=style, color=color, capsize=2,
                        label=f"{name} ({m})", alpha=1.0 if m == "healed" else 0.5)  # fmt: skip
    ax.axhline(0, color="gray", lw=0.6)
    ax.set(xlabel="round", ylabel=f"d{info.trait_key} vs base (nats)", title="shift: raw, calibrated, discriminative")


def trajectory_png(info: RunInfo, collapse_rows: list[dict], path: Path) -> None:
    """Five panels: trait vs round, coherence vs round, trait vs coherence, the shift per round three ways
    (raw, calibrated, discriminative), collapse precursors."""
    fig, ax = plt.subplots(1, 5, figsize=(25, 4.2))
    _per_round(ax[0], ax[1], info)
    _map(ax[2], info)
    _shifts(ax[3], info)
    _precursors(ax[4], collapse_rows)
    for a in (ax[0], ax[1], ax[3], ax[4]):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    for a in ax:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:  # an empty panel (no finished round yet) gets no legend
            a.legend(fontsize=8)
    fig.suptitle(Path(path).parent.name, fontsize=9)
    fig.tight_layout()
    save(fig, path)


STYLE = {"steer": ("tab:blue", "o-"), "prompt": ("tab:green", "^-"), "random": ("gray", "x"),
         "healed": ("tab:orange", "s-"), "base": ("black", "*")}  # fmt: skip


def frontier_png(rows: list[dict], path: Path, trait_key: str, x: str, title: str) -> None:
    """Four panels: the frontier plane for the raw trait and for the discriminative trait (each arm's shift
    against coherence or ref_nll, 95 % intervals as error bars; steering and prompting as curves, the random
    null as a cloud, healed rounds joined in order), the per-vignette shift of the target for each arm, and
    every foundation's shift for the steered, strongest-prompt and last healed arms."""
    fig, ax = plt.subplots(2, 2, figsize=(17, 10.5))
    ax = ax.ravel()
    _plane(ax[0], rows, x, "dTrait", f"d{trait_key} vs base (nats)", "raw trait vs coherence, 95% intervals")
    _plane(ax[1], rows, x, "dTrait_disc", f"discriminative d{trait_key}: target-labelled minus the rest (nats)",
           "item-discriminative trait (0 = only the answer word's prior moved)")  # fmt: skip
    shown = [r for r in rows if r["kind"] != "base"]
    ax[2].boxplot([r["per_vignette"] for r in shown], showfliers=False)
    ax[2].set_xticks(range(1, len(shown) + 1), [r["arm"] for r in shown], rotation=60, fontsize=7)
    ax[2].axhline(0, color="gray", lw=0.6)
    ax[2].set(ylabel=f"per-vignette shift of log p({trait_key[:-5]}) (nats)", title="per-vignette shifts")
    _foundation_bars(ax[3], rows)
    for a in ax:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)


def _plane(ax, rows: list[dict], x: str, key: str, ylabel: str, title: str) -> None:
    """Each arm's `key` shift (with its interval) against coherence or ref_nll, one style per kind. An arm
    measured on a subset of the vignettes (the null) sits at base coherence + its paired dCoh."""
    xkey = "coherence" if x == "coherence" else "ref_nll"
    base = next((r for r in rows if r["kind"] == "base"), None)
    for kind, (color, style) in STYLE.items():
        pts = [r for r in rows if r["kind"] == kind and r.get(key) is not None]
        pts = sorted(pts, key=lambda r: r.get("c", r.get("round", 0)) or 0)
        if xkey == "coherence" and base:
            xs = [base["coherence"] + r["dCoh"] for r in pts]
        else:
            pts = [r for r in pts if r.get(xkey) is not None]
            xs = [r[xkey] for r in pts]
        if not pts:
            continue
        ys = [r[key] for r in pts]
        err = [[r[key] - r[f"{key}_lo"] for r in pts], [r[f"{key}_hi"] - r[key] for r in pts]]
        if xkey == "coherence":
            xerr = [[r["dCoh"] - r["dCoh_lo"] for r in pts], [r["dCoh_hi"] - r["dCoh"] for r in pts]]
        else:
            xerr = None
        ax.errorbar(xs, ys, yerr=err, xerr=xerr, fmt=style, color=color, label=kind, capsize=2, ms=6,
                    alpha=0.5 if kind == "random" else 1.0)  # fmt: skip
        for r, xv, yv in zip(pts, xs, ys):
            if kind != "random":
                ax.annotate(r["arm"], (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="gray", lw=0.6)
    xlabel = "coherence (answer mass)" if xkey == "coherence" else "capability tax: reference NLL (nats/token)"
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if xkey == "ref_nll":
        ax.invert_xaxis()  # better to the right on both axes


def _foundation_bars(ax, rows: list[dict]) -> None:
    """Shift of every foundation (with interval) for the key arms: is the move surgical or broad?"""
    pick = []
    for kind in ("steer", "prompt", "healed"):
        pts = [r for r in rows if r["kind"] == kind]
        if pts:
            pick.append(max(pts, key=lambda r: (r.get("c") or 0, r.get("force") or 0, r.get("round") or 0)))
    names = list(pick[0]["foundations"]) if pick else []
    width = 0.8 / max(1, len(pick))
    for i, r in enumerate(pick):
        est = [r["foundations"][f]["est"] for f in names]
        err = [[e - r["foundations"][f]["lo"] for f, e in zip(names, est)],
               [r["foundations"][f]["hi"] - e for f, e in zip(names, est)]]  # fmt: skip
        xs = [j + (i - (len(pick) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, est, width, yerr=err, capsize=2, label=r["arm"], color=STYLE[r["kind"]][0])
    ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    ax.axhline(0, color="gray", lw=0.6)
    ax.set(ylabel="shift vs base (nats)", title="every foundation's shift")


ARM_FIGURES = ("final_dtrait", "final_dtrait_disc", "final_coh", "A_steer", "A_prompt", "A_steer_disc")


def arms_png(agg: list[dict], path: Path, title: str) -> None:
    """One panel per headline figure: each arm's mean across seeds with its 95 % t-interval (and the seeds)."""
    keys = [k for k in ARM_FIGURES if any(a[k]["n"] for a in agg)]
    fig, ax = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    names = [a.get("arm") or ", ".join(str(v) for k, v in a.items() if k not in ("runs", "seeds")) for a in agg]
    for a_, k in zip(ax[0], keys):
        for i, arm in enumerate(agg):
            t = arm[k]
            if t["mean"] is None:
                continue
            err = None if t["lo"] is None else [[t["mean"] - t["lo"]], [t["hi"] - t["mean"]]]
            a_.errorbar([i], [t["mean"]], yerr=err, fmt="o", capsize=4, color="tab:blue")
        a_.axhline(0, color="gray", lw=0.6)
        a_.set_xticks(range(len(agg)), names, rotation=30, fontsize=7, ha="right")
        a_.set(title=f"{k}: mean, 95% t-interval over seeds")
        a_.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)


def save(fig, path: Path, dpi: int = 110) -> None:
    """Write a figure as PNG atomically (temp file + rename) and close it."""
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)

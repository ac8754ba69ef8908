"""The trajectory figure of a run: trait and coherence per round, the trait-coherence map, and the
collapse precursors relative to the base model. Built from a `RunInfo` alone.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from steer_heal.records import RunInfo, isfinite  # noqa: E402

PRECURSORS = ("coherence", "pr_band", "pr_final", "entropy_mean", "entropy_p5", "amp")


def _per_round(ax_trait, ax_coh, info: RunInfo) -> None:
    """Trait and coherence against round, steered and healed, with the base and the floor as lines."""
    rs = [r.round for r in info.rounds]
    for m, style in (("steered", "o--"), ("healed", "s-")):
        ax_trait.plot(rs, [getattr(r, f"{m}_trait") for r in info.rounds], style, label=m)
        ax_coh.plot(rs, [getattr(r, f"{m}_coh") for r in info.rounds], style, label=m)
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
        s, h = (r.steered_trait, r.steered_coh), (r.healed_trait, r.healed_coh)
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


def trajectory_png(info: RunInfo, collapse_rows: list[dict], path: Path) -> None:
    """Four panels: trait vs round, coherence vs round, trait vs coherence, collapse precursors."""
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    _per_round(ax[0], ax[1], info)
    _map(ax[2], info)
    _precursors(ax[3], collapse_rows)
    for a in (ax[0], ax[1], ax[3]):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(Path(path).parent.name, fontsize=9)
    fig.tight_layout()
    save(fig, path)


def save(fig, path: Path, dpi: int = 110) -> None:
    """Write a figure atomically (temp file + rename) and close it."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)

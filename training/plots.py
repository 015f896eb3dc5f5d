"""The run's figure: explained variance and L0 against the inference budget k' (one line per SAE)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt

from hf_sae._io import atomic_path

matplotlib.use("Agg")  # files only, never a window


def plot_budget_curves(sae_metrics: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    """Write a PNG with EV(k') and L0(k') for every SAE in ``{name: {"budgets": {k': {...}}}}``; returns ``path``."""
    fig, (ax_ev, ax_l0) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for name, result in sae_metrics.items():
        budgets = sorted(int(b) for b in result["budgets"])
        ev = [result["budgets"][str(b)]["explained_variance"] for b in budgets]
        l0 = [result["budgets"][str(b)]["l0"] for b in budgets]
        ax_ev.plot(budgets, ev, marker="o", label=name)
        ax_l0.plot(budgets, l0, marker="o", label=name)
        for b, value in zip(budgets, ev if len(sae_metrics) == 1 else []):  # labels only when they cannot collide
            ax_ev.annotate(
                f"{value:.2f}", (b, value), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7
            )
    top = max(int(b) for r in sae_metrics.values() for b in r["budgets"])
    ax_l0.plot([1, top], [1, top], color="grey", linestyle=":", label="L0 = k'")
    ticks = sorted({int(b) for r in sae_metrics.values() for b in r["budgets"]})
    for ax, label in ((ax_ev, "explained variance (held out)"), (ax_l0, "L0 (active latents per token)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("budget k' (latents kept at inference)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_ev.set_ylim(top=1.0)
    ax_l0.set_yscale("log", base=2)
    ax_l0.set_yticks(ticks, [str(t) for t in ticks])
    ax_l0.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return Path(path)

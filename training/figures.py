"""Experiment plots as PNG: NDCG@10 per market beside peers, and the market-similarity heatmap.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot state, no GUI backend).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from training.experiment import ProtocolResult

PEER_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


def plot_ndcg(
    result: ProtocolResult, peers: dict[str, dict[str, float]], path: Path
) -> Path:
    """Grouped bars of our models' test NDCG@10 per market (± std), peers as markers."""
    table = result.aggregate()
    markets = result.markets
    x = np.arange(len(markets), dtype=np.float64)
    width = 0.8 / len(result.models)
    fig = Figure(figsize=(max(7.0, 1.4 * len(markets) + 3), 4.5))
    ax = fig.add_subplot()
    for k, model in enumerate(result.models):
        means = [table[m][model]["ndcg@10"]["mean"] for m in markets]
        stds = [table[m][model]["ndcg@10"]["std"] for m in markets]
        ax.bar(x - 0.4 + (k + 0.5) * width, means, width, yerr=stds, capsize=2, label=model)
    for k, (name, by_market) in enumerate(peers.items()):
        shown = [(i, by_market[m]) for i, m in enumerate(markets) if m in by_market]
        if shown:
            xs, ys = zip(*shown, strict=True)
            ax.scatter(xs, ys, marker=PEER_MARKERS[k % len(PEER_MARKERS)], color="black",
                       s=28, zorder=3, label=f"{name} (published)")
    ax.set_xticks(x, markets)
    ax.set_ylabel("test NDCG@10")
    ax.set_title(f"NDCG@10 per market, protocol {result.protocol}, "
                 f"{len(result.seeds)} seed(s)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_market_similarity(markets: list[str], cosine: np.ndarray, path: Path) -> Path:
    """Heatmap of the cosine similarity between the markets' learned embeddings."""
    fig = Figure(figsize=(1.0 + 0.7 * len(markets), 0.6 + 0.7 * len(markets)))
    ax = fig.add_subplot()
    image = ax.imshow(cosine, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(len(markets)), markets)
    ax.set_yticks(range(len(markets)), markets)
    for i in range(len(markets)):
        for j in range(len(markets)):
            color = "white" if abs(cosine[i, j]) > 0.6 else "black"
            ax.text(j, i, f"{cosine[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color=color)
    ax.set_title("market embedding cosine similarity")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)

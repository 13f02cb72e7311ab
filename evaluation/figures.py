"""PNG figures of evaluation, benchmark and refresh reports, for MLflow runs (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def ttft_cdf(samples: dict[str, list[float]], path: Path) -> Path:
    """Empirical CDF of warm TTFT, one line per mode or policy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in samples.items():
        ordered = np.sort(np.asarray(values, dtype=float))
        ax.step(ordered, np.arange(1, len(ordered) + 1) / len(ordered), where="post", label=name)
    ax.set(xlabel="TTFT (ms)", ylabel="share of requests", title="warm TTFT, cumulative")
    ax.legend(fontsize=7)
    return _save(fig, path)


def accuracy_vs_ttft(results: dict, path: Path, metric: str = "ndcg@10") -> Path:
    """``metric`` against TTFT p50 for every mode and policy timed; the Pareto front joined."""
    points = [
        (name, r["ttft_ms_p50"], r[metric])
        for name, r in results.items()
        if "ttft_ms_p50" in r and metric in r and not name.startswith("control")
    ]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, x, y in points:
        ax.scatter(x, y)
        ax.annotate(name, (x, y), fontsize=7)
    front, best = [], -np.inf
    for _, x, y in sorted(points, key=lambda p: p[1]):
        if y > best:
            front.append((x, y))
            best = y
    if front:
        ax.plot(*zip(*front, strict=True), linestyle="--", linewidth=1, label="Pareto front")
        ax.legend(fontsize=7)
    ax.set(xlabel="TTFT p50 (ms)", ylabel=metric, title=f"{metric} vs TTFT")
    return _save(fig, path)


def recompute_vs_agreement(results: dict, path: Path) -> Path:
    """Top-1 agreement with ``full`` against the share of the prompt recomputed, per cached mode."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        if "recompute_fraction" in r and "top1_agreement_with_full" in r:
            ax.scatter(r["recompute_fraction"], r["top1_agreement_with_full"])
            ax.annotate(name, (r["recompute_fraction"], r["top1_agreement_with_full"]), fontsize=7)
    ax.set(xlabel="share of prompt recomputed", ylabel="top-1 agreement with full", ylim=(-0.05, 1.05))
    ax.set_title("recompute vs agreement")
    return _save(fig, path)


def bar_chart(values: dict[str, float], path: Path, ylabel: str, title: str) -> Path:
    """One bar per name (bench TTFT per mode and workload, refresh counts)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(values) + 2), 4))
    ax.bar(list(values), list(values.values()))
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    return _save(fig, path)

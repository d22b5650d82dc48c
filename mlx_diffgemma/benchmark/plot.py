"""The accuracy / work trade-off of the sampler variants, as a PNG (matplotlib).

matplotlib is imported only here, when a plot is asked for: it is an optional
dependency (``pip install mlx-diffgemma[plot]``).
"""

import math
from pathlib import Path

from ..files import atomic_write, check_writable


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'mlx-diffgemma[plot]'") from None
    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: str):
    """ValueError naming --plot if the PNG could not be written (before any timing)."""
    _pyplot()
    target = Path(path).expanduser()
    if target.suffix.lower() != ".png":
        raise ValueError(f"--plot {path}: the plot is a PNG; name it *.png")
    try:
        check_writable(target)
    except ValueError as e:
        raise ValueError(f"--plot {e}") from None


def plot_tradeoff(evaluation: dict, path: Path, title: str = "") -> Path:
    """Accuracy against denoising FLOPs per committed token, one labelled point
    per variant; the reference and ``fast`` stand out. Written atomically."""
    plt = _pyplot()
    variants = evaluation["variants"]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    placed = []  # (log10 x, y) of the points labelled so far
    for name, v in variants.items():
        x, y = v["denoise_flops_per_token"] / 1e6, 100 * v["accuracy"]
        special = {"reference": "tab:red", "fast": "tab:green"}.get(name)
        ax.scatter([x], [y], s=60 if special else 30, color=special or "tab:blue", zorder=3)
        # Points close together get their labels stacked, not printed over each other.
        near = sum(1 for px, py in placed if abs(px - math.log10(x)) < 0.2 and abs(py - y) < 4)
        placed.append((math.log10(x), y))
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4 - 10 * near), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("denoising MFLOP per committed token (log scale)")
    metric = evaluation.get("metric", "exact")
    how = "exact match" if metric == "exact" else metric.rpartition(":")[2]
    ax.set_ylabel(f"accuracy, % ({how}, {evaluation['problems']} problems)")
    ax.set_title(title or evaluation["data"], fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()

    def write(temporary: str):
        fig.savefig(temporary, format="png")

    try:
        return atomic_write(path, write)
    finally:
        plt.close(fig)

"""Small matplotlib figures written as PNG (headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffex.io.atomic import write_atomic  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 110) -> Path:
    """Save and close a figure atomically."""
    out = write_atomic(path, lambda p: fig.savefig(p, dpi=dpi, bbox_inches="tight", format="png"))
    plt.close(fig)
    return out


def training_curve(
    history: list[dict[str, float]],
    evals: list[dict[str, float]],
    path: str | Path,
    title: str,
    eval_keys: tuple[str, ...] = (),
) -> Path:
    """Training loss (smoothed) and selected validation metrics against step."""
    fig, axes = plt.subplots(1, 2 if eval_keys else 1, figsize=(10 if eval_keys else 5, 3.5))
    axes = np.atleast_1d(axes)
    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history])
    axes[0].plot(steps, loss, color="0.7", lw=0.6, label="loss")
    if len(loss) > 10:
        k = max(2, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        axes[0].plot(steps[k - 1 :], smooth, color="C0", lw=1.5, label=f"mean of {k}")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].legend(frameon=False)
    if eval_keys and evals:
        es = [e["step"] for e in evals]
        for key in eval_keys:
            axes[1].plot(es, [e[key] for e in evals], marker="o", ms=3, label=key)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("validation")
        axes[1].legend(frameon=False)
    fig.suptitle(title)
    return save_figure(fig, path)


def confusion_and_reliability(
    confusion: list[list[int]],
    rel: dict[str, list[float]],
    class_names: list[str],
    path: str | Path,
    title: str,
) -> Path:
    """Confusion matrix and reliability diagram side by side."""
    cm = np.asarray(confusion)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    a.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            a.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    a.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    a.set_yticks(range(len(class_names)), class_names)
    a.set_xlabel("predicted")
    a.set_ylabel("true")
    a.set_title("confusion (test)")
    conf = np.asarray(rel["confidence"], dtype=float)
    acc = np.asarray(rel["accuracy"], dtype=float)
    ok = ~np.isnan(conf)
    b.plot([0, 1], [0, 1], ls="--", color="0.6")
    b.plot(conf[ok], acc[ok], marker="o", color="C1")
    b.set_xlim(0, 1)
    b.set_ylim(0, 1)
    b.set_xlabel("confidence")
    b.set_ylabel("accuracy")
    b.set_title("reliability (test)")
    fig.suptitle(title)
    return save_figure(fig, path)

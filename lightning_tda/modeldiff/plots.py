"""Figures of ModelDiff results (matplotlib ``Figure`` objects, never shown).

- :func:`plot_direction_variances`: each direction's variance under both algorithms, and the
  height its own bar must pass to be distinguishing (the other's variance plus the noise margin);
- :func:`plot_direction_examples`: per direction, the top positive and negative training images
  and the top test images;
- :func:`plot_verification`: both algorithms' counterfactual effects side by side;
- :func:`summary_figure`: all three in one picture, what each case-study example ends with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from lightning_tda.modeldiff.directions import DistinguishingDirections
    from lightning_tda.modeldiff.verification import VerificationResult

COLORS = ("#1f77b4", "#ff7f0e")


def _new_axes(ax: "Axes | None", size: tuple[float, float]) -> tuple[Figure, "Axes"]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig = Figure(figsize=size)
    return fig, fig.add_subplot(1, 1, 1)


def plot_direction_variances(directions: "DistinguishingDirections", ax: "Axes | None" = None) -> tuple[Figure, "Axes"]:
    """Grouped bars: variance fraction under A and B per direction; a black tick over the own
    bar marks the height it must pass to be distinguishing; a star marks those that do."""
    fig, ax = _new_axes(ax, (1.2 + 0.9 * directions.num, 3.2))
    x = np.arange(directions.num)
    width = 0.38
    for offset, name, values, color in ((-width / 2, directions.names[0], directions.variance_a, COLORS[0]),
                                         (width / 2, directions.names[1], directions.variance_b, COLORS[1])):
        ax.bar(x + offset, values, width, label=f"variance under {name}", color=color)
    own_offset = -width / 2 if directions.of == "a" else width / 2
    if directions.floor_measured:
        needed = directions.variance_other + directions.noise_margin * directions.noise_floor
        ax.hlines(needed, x + own_offset - width / 2, x + own_offset + width / 2, colors="black", linewidth=2,
                  label=f"needed: other + {directions.noise_margin:g} x noise floor")
        for j in np.flatnonzero(directions.distinguishing):
            top = max(float(directions.variance_own[j]), float(needed[j]))
            ax.annotate("*", (x[j] + own_offset, top), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=14)
    ax.set_xticks(x, [f"{j}" for j in x])
    ax.set_xlabel(f"direction of {directions.name} (not {directions.other})")
    ax.set_ylabel("fraction of variance")
    floor = f"noise floor {directions.noise_floor:.3g}" if directions.floor_measured else "no noise floor"
    ax.set_title(f"{directions.name}'s directions: {int(directions.distinguishing.sum())} distinguishing ({floor})", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_ylim(0, max(float(np.max(directions.variance_a)), float(np.max(directions.variance_b)),
                       float(np.max(directions.variance_other + directions.noise_margin * np.nan_to_num(directions.noise_floor)))) * 1.35 + 1e-9)
    return fig, ax


def _caption(index: int, value: float, labels: np.ndarray | None) -> str:
    label = "" if labels is None else f" y={int(labels[index])}"
    return f"#{index}{label}\n{value:+.2g}"


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]


def _mosaic(tiles: list[tuple[np.ndarray, tuple[int, int, int]]], gap: int = 3) -> tuple[np.ndarray, list[float]]:
    """One RGB image of ``tiles`` side by side, each framed in its colour; and each tile's centre x."""
    h, w = tiles[0][0].shape[:2]
    width = len(tiles) * (w + 2 + gap) - gap
    out = np.full((h + 2, width, 3), 255, dtype=np.uint8)
    centres = []
    for i, (image, colour) in enumerate(tiles):
        x0 = i * (w + 2 + gap)
        out[:, x0 : x0 + w + 2] = colour
        out[1 : h + 1, x0 + 1 : x0 + w + 1] = _rgb(image)
        centres.append(x0 + (w + 2) / 2 - 0.5)
    return out, centres


FRAMES = {"positive": (31, 119, 180), "negative": (214, 39, 40), "test": (44, 160, 44)}


def plot_direction_examples(directions: "DistinguishingDirections", which: Sequence[int] | None = None, fig: Figure | None = None) -> Figure:
    """One row per direction: its ``k`` top positive training images (blue frames), ``k`` top
    negative training images (red) and ``k`` top test images (green), captioned with index, label
    and weight or loading. Each row is one image (cheap to draw, whatever ``k``)."""
    if directions.top_train_images is None or directions.top_test_images is None:
        raise ValueError("no images: call directions.with_images(train, test) first")
    which = list(range(directions.num)) if which is None else list(which)
    k = directions.top_test_images.shape[1]
    if fig is None:
        fig = Figure(figsize=(0.72 * 3 * k + 0.8, 1.15 * len(which) + 0.4))
    axes = np.atleast_1d(fig.subplots(len(which), 1, squeeze=False)[:, 0])
    for ax, j in zip(axes, which):
        top = directions.top_train(j, k)
        test_idx, test_load = directions.top_test(j, k)
        tiles = ([(directions.top_train_images[j, 0, i], FRAMES["positive"]) for i in range(k)]
                 + [(directions.top_train_images[j, 1, i], FRAMES["negative"]) for i in range(k)]
                 + [(directions.top_test_images[j, i], FRAMES["test"]) for i in range(k)])
        captions = ([_caption(top.positive[i], top.positive_weights[i], directions.train_labels) for i in range(k)]
                    + [_caption(top.negative[i], top.negative_weights[i], directions.train_labels) for i in range(k)]
                    + [_caption(test_idx[i], test_load[i], directions.test_labels) for i in range(k)])
        mosaic, centres = _mosaic(tiles)
        ax.imshow(mosaic, interpolation="nearest")
        for x, caption in zip(centres, captions):
            ax.text(x, -0.8, caption, ha="center", va="bottom", fontsize=5.5)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        verdict = "distinguishing" if directions.distinguishing[j] else "below floor"
        ax.set_ylabel(f"dir {j}\n{verdict}", fontsize=7)
    fig.suptitle(
        f"{directions.name} vs {directions.other}: top training examples (+ blue, - red) and top test examples (green)",
        fontsize=8,
    )
    return fig


def plot_verification(result: "VerificationResult", ax: "Axes | None" = None) -> tuple[Figure, "Axes"]:
    """Mean effect with its bootstrap interval per algorithm, and each model's effect as a dot."""
    fig, ax = _new_axes(ax, (3.4, 3.2))
    rng = np.random.default_rng(0)
    for i, (effects, mean, ci, color) in enumerate((
        (result.effects_a, result.mean_a, result.ci_a, COLORS[0]),
        (result.effects_b, result.mean_b, result.ci_b, COLORS[1]),
    )):
        ax.bar(i, mean, 0.6, color=color, alpha=0.6)
        ax.errorbar(i, mean, yerr=[[mean - ci[0]], [ci[1] - mean]], color="black", capsize=6, linewidth=1.5)
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(effects)), effects, s=10, color="black", zorder=3)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xticks([0, 1], list(result.names))
    ax.set_ylabel(f"Pr({result.target} | T(x)) - Pr({result.target} | x)", fontsize=8)
    ax.set_title(f"{result.transformation}\n{int(result.confidence * 100)}% CI over models", fontsize=8)
    return fig, ax


def summary_figure(
    directions: "DistinguishingDirections",
    other_directions: "DistinguishingDirections | None" = None,
    verification: "VerificationResult | None" = None,
    show: int = 2,
    title: str | None = None,
) -> Figure:
    """One picture of a comparison: the top ``show`` directions' examples (of ``directions``
    and ``other_directions``), both variance charts, and the verification."""
    panels = [d for d in (directions, other_directions) if d is not None]
    k = directions.top_test_images.shape[1] if directions.top_test_images is not None else 6
    width = max(0.75 * 3 * k + 0.6, 3.6 * (len(panels) + (verification is not None)))
    heights = [1.05 * min(show, d.num) + 0.5 for d in panels if d.top_train_images is not None] + [3.4]
    fig = Figure(figsize=(width, sum(heights) + 0.4), layout="constrained")
    rows = fig.subfigures(len(heights), 1, height_ratios=heights)
    rows = np.atleast_1d(rows)
    r = 0
    for d in panels:
        if d.top_train_images is not None:
            plot_direction_examples(d, range(min(show, d.num)), fig=rows[r])
            r += 1
    bottom = rows[r].subplots(1, len(panels) + (verification is not None), squeeze=False)[0]
    for ax, d in zip(bottom, panels):
        plot_direction_variances(d, ax=ax)
    if verification is not None:
        plot_verification(verification, ax=bottom[-1])
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


__all__ = ["plot_direction_examples", "plot_direction_variances", "plot_verification", "summary_figure"]

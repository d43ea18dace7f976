r"""Representation overlap: do two models' embeddings hold the same features, or different ones?

The seed paper's test: train linear probes on each embedding, on random mixes of the two
embeddings' dimensions at inverse rates under a fixed total dimension (25/75, 50/50, 75/25),
and on their concatenation. If one representation contained the other, mixing could not beat
the better one at the same dimension; overlapping-but-different features make mixes and the
concatenation win. Alongside the probes: distance correlation (:mod:`lightning_tda.dcor`)
between the embeddings, partial dCor given the labels (what they share beyond the task), and
pdCor of each with the labels given the other (what each knows that the other does not), plus
linear CKA for reference,

.. math::

    \mathrm{CKA}(X, Y) = \frac{\lVert \tilde Y^\top \tilde X \rVert_F^2}
        {\lVert \tilde X^\top \tilde X \rVert_F \, \lVert \tilde Y^\top \tilde Y \rVert_F}

with :math:`\tilde X, \tilde Y` the column-centred embeddings (Kornblith et al., 2019).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_tda.data import BatchFn, BatchParser
from lightning_tda.dcor import distance_correlation, partial_distance_correlation
from lightning_tda.results import AnalysisResult

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["OverlapResult", "layer_embeddings", "linear_cka", "linear_probe_accuracy", "representation_overlap"]


def _as_matrix(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    array = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if array.ndim < 2 or array.shape[0] == 0:
        raise ValueError(f"{name} must be embeddings of shape [n, ...] with n >= 1, got {array.shape}")
    array = array.reshape(array.shape[0], -1).astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return array


def linear_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Linear centred kernel alignment of two embeddings of the same ``n`` examples (any
    widths), in [0, 1]; 0 when either is constant.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(50, 4))
        >>> round(linear_cka(x, 3 * x @ np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))[0]), 6)
        1.0
    """
    a, b = _as_matrix(x, "x"), _as_matrix(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"x has {a.shape[0]} examples and y {b.shape[0]}; embed the same examples")
    a, b = a - a.mean(0), b - b.mean(0)
    den = np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)
    return float(np.linalg.norm(b.T @ a) ** 2 / den) if den > 0 else 0.0


def linear_probe_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, c: float = 1.0, max_iter: int = 500
) -> float:
    """Test accuracy of a multinomial logistic regression (L2, strength ``1/c``) on standardised
    features (the scaler fitted on the training rows)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    probe = LogisticRegression(C=c, max_iter=max_iter)
    probe.fit(scaler.transform(train_x), train_y)
    return float((probe.predict(scaler.transform(test_x)) == test_y).mean())


@torch.no_grad()
def layer_embeddings(
    model: nn.Module, layer: str, dataset: Dataset, batch_size: int = 256, batch_fn: BatchFn | None = None
) -> Tensor:
    """The flattened output of ``model``'s submodule ``layer`` on every example of ``dataset``
    in order, in eval mode: ``[n, width]`` (float32, CPU)."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"no layer named {layer!r} in {type(model).__name__}; layers are: {names}") from None
    parser, captured = BatchParser(batch_fn=batch_fn), []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out if isinstance(out, Tensor) else out[0]))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        parts = []
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x, _ = parser(batch)
            captured.clear()
            model(x.to(device))
            parts.append(captured[0].flatten(1).float().cpu())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(parts)


@dataclasses.dataclass(frozen=True)
class OverlapResult(AnalysisResult):
    """Linear-probe accuracies of two embeddings, their mixes and concatenation (``feature_sets``
    with ``dims``, ``accuracy_mean`` and ``accuracy_std`` over the random draws), and the
    dependence statistics between the embeddings."""

    names: tuple[str, str]
    feature_sets: tuple[str, ...]
    dims: np.ndarray
    accuracy_mean: np.ndarray
    accuracy_std: np.ndarray
    distance_correlation: float
    partial_dcor_given_labels: float
    partial_dcor_a_labels_given_b: float
    partial_dcor_b_labels_given_a: float
    linear_cka: float
    total_dim: int
    repeats: int
    seed: int
    n_train: int
    n_test: int

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame({
            "features": list(self.feature_sets), "dims": self.dims,
            "probe_accuracy": self.accuracy_mean, "probe_accuracy_std": self.accuracy_std,
        })

    def summary(self) -> dict[str, float]:
        acc = dict(zip(self.feature_sets, self.accuracy_mean.tolist()))
        mixes = [v for k, v in acc.items() if k.startswith("mix")]
        singles = [acc[f"{name} at {self.total_dim}"] for name in self.names]
        return {
            "distance_correlation": self.distance_correlation,
            "partial_dcor_given_labels": self.partial_dcor_given_labels,
            "partial_dcor_a_labels_given_b": self.partial_dcor_a_labels_given_b,
            "partial_dcor_b_labels_given_a": self.partial_dcor_b_labels_given_a,
            "linear_cka": self.linear_cka,
            "probe_concatenation": acc["concatenation"],
            "probe_best_single_at_total_dim": max(singles),
            "probe_best_mix": max(mixes) if mixes else float("nan"),
        }

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        """Probe accuracy of each feature set, with the spread over random draws."""
        if ax is None:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(7.0, 3.8))
            ax = fig.add_subplot(1, 1, 1)
        fig = ax.figure
        x = np.arange(len(self.feature_sets))
        ax.bar(x, 100 * self.accuracy_mean, yerr=100 * self.accuracy_std, color="tab:blue", alpha=0.8, capsize=3)
        ax.set_xticks(x, labels=[f"{f}\n({d})" for f, d in zip(self.feature_sets, self.dims)], fontsize=7, rotation=30, ha="right")
        low = float(np.nanmin(self.accuracy_mean - self.accuracy_std))
        ax.set_ylim(max(0.0, 100 * low - 3), min(100.0, 100 * float(np.nanmax(self.accuracy_mean + self.accuracy_std)) + 1.5))
        ax.set_ylabel("linear probe accuracy (%)")
        ax.set_title(
            f"{self.names[0]} vs {self.names[1]}: dCor {self.distance_correlation:.2f}, "
            f"linear CKA {self.linear_cka:.2f}", fontsize=10,
        )
        return fig, ax


def representation_overlap(
    train_a: Tensor | np.ndarray,
    train_b: Tensor | np.ndarray,
    train_target: Tensor | np.ndarray,
    test_a: Tensor | np.ndarray,
    test_b: Tensor | np.ndarray,
    test_target: Tensor | np.ndarray,
    *,
    names: tuple[str, str] = ("a", "b"),
    total_dim: int | None = None,
    rates: Sequence[float] = (0.25, 0.5, 0.75),
    repeats: int = 3,
    seed: int = 0,
    probe_c: float = 1.0,
) -> OverlapResult:
    """Compare two embeddings of the same examples (module docstring).

    Args:
        train_a, train_b, train_target: both embeddings ``[n_train, ...]`` and labels of the rows
            the probes are fitted on.
        test_a, test_b, test_target: the same for the rows the probes are scored on (and the
            dependence statistics computed on).
        names: of the two models.
        total_dim: the fixed dimension of the mixes (default: the smaller width).
        rates: shares of the total dimension drawn from ``a`` (the rest from ``b``); the
            single embeddings at ``total_dim`` (rates 1 and 0) are always added.
        repeats: random draws of dimensions per rate (mean and spread reported).
        probe_c: inverse L2 strength of the logistic-regression probes.
    """
    tr_a, tr_b, te_a, te_b = (_as_matrix(v, n) for v, n in ((train_a, "train_a"), (train_b, "train_b"), (test_a, "test_a"), (test_b, "test_b")))
    tr_y, te_y = np.asarray(train_target).reshape(-1), np.asarray(test_target).reshape(-1)
    for what, a, b, y in (("train", tr_a, tr_b, tr_y), ("test", te_a, te_b, te_y)):
        if not a.shape[0] == b.shape[0] == y.shape[0]:
            raise ValueError(f"{what} embeddings and labels must cover the same examples: {a.shape[0]}, {b.shape[0]}, {y.shape[0]}")
    if tr_a.shape[1] != te_a.shape[1] or tr_b.shape[1] != te_b.shape[1]:
        raise ValueError("train and test embeddings of one model must have the same width")
    if te_a.shape[0] < 4:
        raise ValueError(f"the test split needs at least 4 examples (partial dCor), got {te_a.shape[0]}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    d_a, d_b = tr_a.shape[1], tr_b.shape[1]
    total = min(d_a, d_b) if total_dim is None else int(total_dim)
    shares = [1.0] + sorted({float(r) for r in rates}, reverse=True) + [0.0]
    for r in shares:
        if not 0 <= r <= 1:
            raise ValueError(f"rates must be in [0, 1], got {r}")
        k = int(round(r * total))
        if total < 1 or k > d_a or total - k > d_b:
            raise ValueError(
                f"total_dim={total} at rate {r} needs {k} dimensions of {names[0]} (has {d_a}) and "
                f"{total - k} of {names[1]} (has {d_b}); lower total_dim"
            )
    rng = np.random.default_rng(seed)
    sets, dims, means, stds = [], [], [], []

    def probe(cols_a: np.ndarray | None, cols_b: np.ndarray | None) -> float:
        parts_tr = [m[:, c] for m, c in ((tr_a, cols_a), (tr_b, cols_b)) if c is not None]
        parts_te = [m[:, c] for m, c in ((te_a, cols_a), (te_b, cols_b)) if c is not None]
        return linear_probe_accuracy(np.hstack(parts_tr), tr_y, np.hstack(parts_te), te_y, c=probe_c)

    for label, cols_a, cols_b in ((names[0], np.arange(d_a), None), (names[1], None, np.arange(d_b)),
                                  ("concatenation", np.arange(d_a), np.arange(d_b))):
        sets.append(label)
        dims.append((0 if cols_a is None else len(cols_a)) + (0 if cols_b is None else len(cols_b)))
        means.append(probe(cols_a, cols_b))
        stds.append(0.0)
    for r in shares:
        k = int(round(r * total))
        draws = [probe(rng.choice(d_a, k, replace=False) if k else None,
                       rng.choice(d_b, total - k, replace=False) if total - k else None) for _ in range(repeats)]
        label = f"{names[0]} at {total}" if k == total else f"{names[1]} at {total}" if k == 0 else f"mix {round(100 * r)}/{round(100 * (1 - r))}"
        sets.append(label)
        dims.append(total)
        means.append(float(np.mean(draws)))
        stds.append(float(np.std(draws)))
    a, b = torch.from_numpy(te_a), torch.from_numpy(te_b)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(te_y).long()).double()
    return OverlapResult(
        names=(str(names[0]), str(names[1])),
        feature_sets=tuple(sets),
        dims=np.array(dims, dtype=np.int64),
        accuracy_mean=np.array(means),
        accuracy_std=np.array(stds),
        distance_correlation=float(distance_correlation(a, b)),
        partial_dcor_given_labels=float(partial_distance_correlation(a, b, onehot)),
        partial_dcor_a_labels_given_b=float(partial_distance_correlation(a, onehot, b)),
        partial_dcor_b_labels_given_a=float(partial_distance_correlation(b, onehot, a)),
        linear_cka=linear_cka(te_a, te_b),
        total_dim=total,
        repeats=repeats,
        seed=seed,
        n_train=int(tr_a.shape[0]),
        n_test=int(te_a.shape[0]),
    )

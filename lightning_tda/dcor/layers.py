r"""Layer-by-layer comparison of two networks with distance correlation (Zhen et al., ECCV 2022).

:func:`compare_layers` runs each model once over an evaluation set with forward hooks on the
chosen layers (their outputs flattened to ``[n, d_l]``), then gives

- a heatmap of dCor between every layer of model A and every layer of model B;
- the same heatmap with linear CKA (Kornblith et al. 2019), for reference;
- with a third ``signal`` (e.g. one-hot labels): the partial dCor of each layer of A with the
  signal given each layer of B, and the other way round: what one model's layer says about the
  signal beyond the other's.

All dCor values come from one blockwise pass over the distance tiles of every layer at once
(:func:`~lightning_tda.dcor.functional.distance_terms`): no ``n x n`` matrix is held, and the
``L_A x L_B`` values cost one pass, not one per pair. CKA uses the feature-space form
:math:`\|Y^\top X\|_F^2 / (\|X^\top X\|_F \|Y^\top Y\|_F)` of centred activations, which holds
``d_a x d_b`` matrices and never an ``n x n`` one.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_tda.data import BatchFn
from lightning_tda.dcor._data import EvalData, check_positive, data_length, iterate_batches, labels_of, names_unique
from lightning_tda.dcor._hooks import find_layer, first_tensor
from lightning_tda.dcor.functional import Method, check_method, correlations_from_terms, distance_terms
from lightning_tda.results import AnalysisResult, ReporterLike

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "LayerComparison",
    "compare_layers",
    "default_layers",
    "demo_layer_comparison",
    "layer_activations",
    "linear_cka",
]

PartialStatistic = Literal["partial_distance_correlation", "semi_partial_distance_correlation"]
_PARTIALS = ("partial_distance_correlation", "semi_partial_distance_correlation")
_SKIPPED = (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def default_layers(model: nn.Module) -> list[str]:
    """The leaf modules of ``model`` in definition order, without those that only reshape or
    drop (Flatten, Identity, Dropout): what :func:`compare_layers` takes by default."""
    return [
        name for name, module in model.named_modules()
        if name and not any(True for _ in module.children()) and not isinstance(module, _SKIPPED)
    ]


class _Recorder:
    """Forward hook: the flattened output of one layer for every batch, checked to be one call a
    batch (a layer used twice in a forward pass has no single activation to compare)."""

    def __init__(self, where: str, dtype: torch.dtype) -> None:
        self.where, self.dtype = where, dtype
        self.batches: list[Tensor] = []
        self.calls = 0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        out = first_tensor(output, self.where)
        self.batches.append(out.detach().reshape(out.shape[0], -1).to("cpu", self.dtype))
        self.calls += 1


@torch.no_grad()
def layer_activations(
    model: nn.Module,
    data: EvalData,
    layers: Sequence[str] | None = None,
    *,
    batch_size: int = 256,
    batch_fn: BatchFn | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The outputs of ``layers`` of ``model`` over ``data`` in one pass (eval mode, no gradient).

    Args:
        model: any ``nn.Module``; run on each batch's ``x``.
        data: inputs ``[n, ...]``, ``(x, y)``, a Dataset or a DataLoader (walked in order).
        layers: names from ``model.named_modules()`` (default :func:`default_layers`).
        dtype: of the returned activations (on the CPU).

    Returns:
        ``{layer: [n, d_layer]}``, each layer's output flattened per example, in ``layers`` order.
    """
    layers = list(default_layers(model) if layers is None else layers)
    if not layers:
        raise ValueError("no layers to record: pass layer names from model.named_modules()")
    names_unique(layers, "layers")
    modules = {name: find_layer(model, name, f"the model ({type(model).__name__})") for name in layers}
    recorders = {name: _Recorder(f"layer {name!r}", dtype) for name in layers}
    handles = [modules[name].register_forward_hook(recorders[name]) for name in layers]
    was_training = model.training
    model.eval()
    try:
        batches = 0
        for x, _ in tqdm(iterate_batches(data, batch_size, batch_fn), desc="activations", disable=not progress):
            model(x)
            batches += 1
            for name, rec in recorders.items():
                if rec.calls != batches:
                    raise ValueError(
                        f"layer {name!r} ran {rec.calls} times in {batches} forward passes; compare layers "
                        "that run exactly once per forward pass (not a module the model reuses or skips)"
                    )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("the evaluation set is empty")
    return {name: torch.cat(rec.batches) for name, rec in recorders.items()}


def linear_cka(
    xs: Sequence[Tensor], ys: Sequence[Tensor], form: Literal["auto", "feature", "gram"] = "auto",
    block_rows: int = 256,
) -> Tensor:
    r"""Linear CKA between every ``x`` in ``xs`` and ``y`` in ``ys`` (each ``[n, d]``): ``[len(xs), len(ys)]``.

    .. math::

        \mathrm{CKA}(X, Y) = \frac{\|Y_c^\top X_c\|_F^2}{\|X_c^\top X_c\|_F\, \|Y_c^\top Y_c\|_F}
            = \frac{\langle K_X, K_Y \rangle_F}{\|K_X\|_F \|K_Y\|_F}

    with column-centred :math:`X_c, Y_c` and :math:`K = X_c X_c^\top`; 0 for a constant input.
    ``form="auto"`` takes whichever form costs fewer operations: the feature-space form (``d_x x d_y``
    products, ``n (\sum d_x)(\sum d_y)`` operations) or the Gram form, in blocks of
    ``block_rows`` rows of every layer's ``K`` at once (``n^2 (\sum d_x + \sum d_y)``
    operations, ``block_rows x n`` entries a layer; never a whole ``n x n`` matrix). Products of
    the activations in their dtype (at least float32), everything after in float64.
    """
    dtype = torch.promote_types(torch.promote_types(xs[0].dtype, ys[0].dtype), torch.float32)
    cx = [(x.double() - x.double().mean(0)).to(dtype) for x in xs]
    cy = [(y.double() - y.double().mean(0)).to(dtype) for y in ys]
    if form not in ("auto", "feature", "gram"):
        raise ValueError(f"form must be 'auto', 'feature' or 'gram', got {form!r}")
    n = cx[0].shape[0]
    width_x, width_y = sum(c.shape[1] for c in cx), sum(c.shape[1] for c in cy)
    if form == "gram" or (form == "auto" and n * (width_x + width_y) < width_x * width_y):
        cross = torch.zeros(len(cx), len(cy), dtype=torch.float64)
        sq_x, sq_y = torch.zeros(len(cx), dtype=torch.float64), torch.zeros(len(cy), dtype=torch.float64)
        for r0 in range(0, n, block_rows):
            # Gram rows in the inputs' dtype (the n^2 d work), their products in float64 (cheap)
            kx = torch.stack([c[r0 : r0 + block_rows] @ c.T for c in cx]).flatten(1).double()
            ky = torch.stack([c[r0 : r0 + block_rows] @ c.T for c in cy]).flatten(1).double()
            cross += kx @ ky.T
            sq_x += kx.square().sum(1)
            sq_y += ky.square().sum(1)
        norm_x, norm_y = sq_x.sqrt(), sq_y.sqrt()
    else:
        cross = torch.stack([torch.stack([(b.T @ a).double().square().sum() for b in cy]) for a in cx])
        norm_x = torch.stack([torch.linalg.matrix_norm((c.T @ c).double()) for c in cx])
        norm_y = torch.stack([torch.linalg.matrix_norm((c.T @ c).double()) for c in cy])
    den = norm_x[:, None] * norm_y[None, :]
    return torch.where(den > 0, cross / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(cross))


def _partial(r_xy: Tensor, r_xz: Tensor, r_yz: Tensor, semi: bool) -> Tensor:
    """pdCor (or the seed's semi-partial variant) from bias-corrected correlations, 0 where the
    denominator is 0, as :mod:`lightning_tda.dcor.functional` defines them."""
    r_xy, r_xz, r_yz = (r.clamp(-1.0, 1.0) for r in (r_xy, r_xz, r_yz))
    den = (1 - r_xz**2).clamp_min(0).sqrt()
    if not semi:
        den = den * (1 - r_yz**2).clamp_min(0).sqrt()
    num = r_xy - r_xz * r_yz
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _floor(values: np.ndarray) -> float:
    """The colour scale's lower end: the smallest value rounded down to a tenth (at most 0.5,
    so that a scale never starts so high that small differences look large)."""
    return float(min(0.5, np.floor(np.nanmin(values) * 10) / 10))


@dataclasses.dataclass(frozen=True)
class LayerComparison(AnalysisResult):
    """dCor and linear CKA between every layer of model A and every layer of model B; with a
    signal, the partial dCor of each model's layers with it given the other's.

    Arrays are ``[len(layers_a), len(layers_b)]`` (``[i, j]``: layer ``i`` of A, layer ``j`` of
    B); ``partial_b_given_a[i, j]`` is pdCor(B_j, signal; A_i). Signal fields are None without
    a signal.
    """

    model_names: tuple[str, str]
    layers_a: tuple[str, ...]
    layers_b: tuple[str, ...]
    dcor: np.ndarray
    cka: np.ndarray
    n_examples: int
    signal: str | None = None
    partial_statistic: str | None = None
    dcor_signal_a: np.ndarray | None = None
    dcor_signal_b: np.ndarray | None = None
    partial_a_given_b: np.ndarray | None = None
    partial_b_given_a: np.ndarray | None = None
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_frame(self) -> "pd.DataFrame":
        """One row per pair of layers: dCor, CKA and (with a signal) both partial dCors."""
        import pandas as pd

        rows = []
        for i, la in enumerate(self.layers_a):
            for j, lb in enumerate(self.layers_b):
                row: dict[str, Any] = {"layer_a": la, "layer_b": lb, "dcor": float(self.dcor[i, j]),
                                       "cka": float(self.cka[i, j])}
                if self.partial_a_given_b is not None and self.partial_b_given_a is not None:
                    row["pdcor_a_given_b"] = float(self.partial_a_given_b[i, j])
                    row["pdcor_b_given_a"] = float(self.partial_b_given_a[i, j])
                rows.append(row)
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, float]:
        """Mean dCor and CKA, their diagonals where both models have the same layers, and the
        last layers' values (with a signal: their dCor with it and both partial dCors)."""
        out = {"dcor_mean": float(self.dcor.mean()), "cka_mean": float(self.cka.mean()),
               "dcor_last_layers": float(self.dcor[-1, -1]), "cka_last_layers": float(self.cka[-1, -1])}
        if self.layers_a == self.layers_b:
            out["dcor_diagonal_mean"] = float(np.diagonal(self.dcor).mean())
            out["cka_diagonal_mean"] = float(np.diagonal(self.cka).mean())
        if self.dcor_signal_a is not None and self.dcor_signal_b is not None:
            out["dcor_signal_last_a"] = float(self.dcor_signal_a[-1])
            out["dcor_signal_last_b"] = float(self.dcor_signal_b[-1])
        if self.partial_a_given_b is not None and self.partial_b_given_a is not None:
            out["pdcor_last_a_given_b"] = float(self.partial_a_given_b[-1, -1])
            out["pdcor_last_b_given_a"] = float(self.partial_b_given_a[-1, -1])
        return out

    def _heatmap(self, ax: "Axes", values: np.ndarray, title: str, vmin: float, cmap: str) -> None:
        image = ax.imshow(values, vmin=vmin, vmax=1.0, cmap=cmap, aspect="auto")
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        name_a, name_b = self.model_names
        ax.set_xticks(range(len(self.layers_b)), self.layers_b, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(self.layers_a)), self.layers_a, fontsize=7)
        ax.set_xlabel(f"layer of {name_b}")
        ax.set_ylabel(f"layer of {name_a}")
        ax.set_title(title, fontsize=9)
        if values.size <= 144:
            for (i, j), v in np.ndenumerate(values):
                # white text on the dark ends of the colour map: the low end of a sequential one,
                # both ends of a diverging one
                dark = abs(v) > 0.6 if vmin < 0 else v < vmin + 0.5 * (1 - vmin)
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if dark else "black")

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        """The dCor heatmap (rows: layers of A, columns: layers of B)."""
        if ax is None:
            from matplotlib.figure import Figure

            ax = Figure(figsize=(1.5 + 0.55 * len(self.layers_b), 1.5 + 0.45 * len(self.layers_a))).subplots()
        name_a, name_b = self.model_names
        self._heatmap(ax, self.dcor, f"dCor between layers of {name_a} and {name_b} (n={self.n_examples})",
                      _floor(self.dcor), "viridis")
        return ax.figure, ax

    def plot_all(self) -> "Figure":
        """dCor and CKA heatmaps side by side, and with a signal both partial dCor heatmaps."""
        from matplotlib.figure import Figure

        panels = 4 if self.partial_a_given_b is not None else 2
        width, height = 1.5 + 0.55 * len(self.layers_b), 1.8 + 0.45 * len(self.layers_a)
        fig = Figure(figsize=(width * 2, height * panels // 2), layout="constrained")
        axes = fig.subplots(panels // 2, 2, squeeze=False).flat
        name_a, name_b = self.model_names
        self._heatmap(axes[0], self.dcor, f"dCor ({name_a} vs {name_b}, n={self.n_examples})",
                      _floor(self.dcor), "viridis")
        self._heatmap(axes[1], self.cka, "linear CKA", _floor(self.cka), "viridis")
        if self.partial_a_given_b is not None and self.partial_b_given_a is not None:
            what = "pdCor" if self.partial_statistic == "partial_distance_correlation" else "semi-partial dCor"
            self._heatmap(axes[2], self.partial_a_given_b, f"{what}({name_a} layer, {self.signal} | {name_b} layer)",
                          -1.0, "RdBu_r")
            self._heatmap(axes[3], self.partial_b_given_a, f"{what}({name_b} layer, {self.signal} | {name_a} layer)",
                          -1.0, "RdBu_r")
        return fig

    def log(self, reporter: ReporterLike, prefix: str) -> None:
        """Scalars, the per-pair table, and the heatmaps (:meth:`plot_all`) under ``prefix``."""
        reporter.log_metrics({f"{prefix}/{k}": v for k, v in self.summary().items()})
        reporter.log_frame(f"{prefix}_table", self.to_frame())
        reporter.log_figure(prefix, self.plot_all(), close=True)


def compare_layers(
    model_a: nn.Module,
    model_b: nn.Module,
    data_a: EvalData,
    data_b: EvalData | None = None,
    *,
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    signal: Tensor | Literal["labels"] | None = None,
    partial: PartialStatistic = "partial_distance_correlation",
    model_names: tuple[str, str] = ("A", "B"),
    method: Method = "blockwise",
    block_size: int | None = None,
    batch_size: int = 256,
    batch_fn: BatchFn | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> LayerComparison:
    """Compare every layer of ``model_a`` with every layer of ``model_b`` over an evaluation set.

    Args:
        model_a, model_b: any ``nn.Module`` (the same one compares a model with itself).
        data_a: the evaluation set for A: inputs ``[n, ...]``, ``(x, y)``, a Dataset or a DataLoader.
        data_b: B's own view of the same examples in the same order (e.g. another
            normalisation); default ``data_a``. Its length must equal ``data_a``'s.
        layers_a, layers_b: layer names (default :func:`default_layers` of each model).
        signal: ``None``, ``"labels"`` (one-hot labels of ``data_a``) or a tensor ``[n, ...]``:
            adds the partial dCor heatmaps and each layer's dCor with the signal.
        partial: ``"partial_distance_correlation"`` (Székely & Rizzo 2014) or
            ``"semi_partial_distance_correlation"`` (only the layer is projected off the other
            model's, as in the seed's code).
        method, block_size: the functional path; ``"blockwise"`` (default) never holds an
            ``n x n`` matrix, ``"dense"`` is the reference for small sets.
        dtype: of the activations (float64 for exact comparisons on small sets).
    """
    check_method(method, block_size)
    check_positive(batch_size, "batch_size")
    if partial not in _PARTIALS:
        raise ValueError(f"partial must be one of {_PARTIALS}, got {partial!r}")
    same_data = data_b is None or data_b is data_a
    data_b = data_a if data_b is None else data_b
    n_a, n_b = data_length(data_a, "data_a"), data_length(data_b, "data_b")
    if n_a is not None and n_b is not None and n_a != n_b:
        raise ValueError(
            f"evaluation sets of different lengths: data_a has {n_a} examples, data_b has {n_b}; the "
            "comparison pairs example i of one with example i of the other, so pass the same examples "
            "in the same order"
        )
    layers_a = list(default_layers(model_a) if layers_a is None else layers_a)
    layers_b = list(default_layers(model_b) if layers_b is None else layers_b)
    for model, layers, name in ((model_a, layers_a, model_names[0]), (model_b, layers_b, model_names[1])):
        if not layers:
            raise ValueError(f"no layers to compare for model {name}")
        names_unique(layers, f"the layers of model {name}")
        for layer in layers:
            find_layer(model, layer, f"model {name} ({type(model).__name__})")
    signal_tensor: Tensor | None = None
    if isinstance(signal, Tensor):
        if n_a is not None and signal.shape[0] != n_a:
            raise ValueError(f"signal has {signal.shape[0]} rows but the evaluation set has {n_a} examples")
        signal_tensor = signal.reshape(signal.shape[0], -1).to(dtype)
    elif signal == "labels":
        signal_tensor = nn.functional.one_hot(labels_of(data_a, batch_size, batch_fn).long()).to(dtype)
    elif signal is not None:
        raise ValueError(f"signal must be None, 'labels' or a tensor [n, ...], got {signal!r}")

    keywords = dict(batch_size=batch_size, batch_fn=batch_fn, dtype=dtype, progress=progress)
    acts_a = layer_activations(model_a, data_a, layers_a, **keywords)
    if model_b is model_a and same_data:
        acts_b = {name: acts_a[name] for name in layers_b} if set(layers_b) <= set(layers_a) else \
            layer_activations(model_b, data_b, layers_b, **keywords)
    else:
        acts_b = layer_activations(model_b, data_b, layers_b, **keywords)
    n = next(iter(acts_a.values())).shape[0]
    n_b_seen = next(iter(acts_b.values())).shape[0]
    if n_b_seen != n:
        raise ValueError(f"evaluation sets of different lengths: model A saw {n} examples, model B {n_b_seen}")
    if signal_tensor is not None and signal_tensor.shape[0] != n:
        raise ValueError(f"signal has {signal_tensor.shape[0]} rows but the evaluation set has {n} examples")
    for name, acts in (*((f"A.{k}", v) for k, v in acts_a.items()), *((f"B.{k}", v) for k, v in acts_b.items())):
        if not bool(torch.isfinite(acts).all()):
            raise ValueError(f"layer {name} has non-finite activations (NaN or inf); dCor is undefined for them")

    # one pass over the distance tiles of every distinct input
    inputs: list[Tensor] = []
    index: dict[int, int] = {}
    for t in (*acts_a.values(), *acts_b.values(), *([] if signal_tensor is None else [signal_tensor])):
        if id(t) not in index:
            index[id(t)] = len(inputs)
            inputs.append(t)
    ia = [index[id(acts_a[name])] for name in layers_a]
    ib = [index[id(acts_b[name])] for name in layers_b]
    s, r = distance_terms(*inputs, method=method, block_size=block_size)
    squared = correlations_from_terms(s, r, n)
    dcor = squared.clamp_min(0).sqrt()
    fields: dict[str, Any] = {}
    if signal_tensor is not None:
        if n < 4:
            raise ValueError(f"partial dCor needs at least 4 examples, got {n}")
        js = index[id(signal_tensor)]
        u = correlations_from_terms(s, r, n, bias_corrected=True)
        semi = partial == "semi_partial_distance_correlation"
        a_given_b = torch.stack([torch.stack([_partial(u[i, js], u[i, j], u[js, j], semi) for j in ib]) for i in ia])
        b_given_a = torch.stack([torch.stack([_partial(u[j, js], u[j, i], u[js, i], semi) for j in ib]) for i in ia])
        fields = dict(
            signal="labels" if isinstance(signal, str) else "signal", partial_statistic=partial,
            dcor_signal_a=dcor[ia, js].numpy(), dcor_signal_b=dcor[ib, js].numpy(),
            partial_a_given_b=a_given_b.numpy(), partial_b_given_a=b_given_a.numpy(),
        )
    return LayerComparison(
        model_names=tuple(model_names), layers_a=tuple(layers_a), layers_b=tuple(layers_b),
        dcor=dcor[ia][:, ib].numpy(), cka=linear_cka([acts_a[k] for k in layers_a], [acts_b[k] for k in layers_b]).numpy(),
        n_examples=n, settings={"method": method, "block_size": block_size, "dtype": str(dtype)}, **fields,
    )


def demo_layer_comparison(
    model_a: nn.Module | None = None,
    model_b: nn.Module | None = None,
    *,
    fast: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> LayerComparison:
    """The layer comparison end to end on digits (the demo's entry point): two DigitsCNN
    classifiers (trained here from seeds ``seed`` and ``seed + 1`` unless given; 3 epochs with
    ``fast``, 8 without) compared layer by layer over the 359 validation images, with one-hot
    labels as the signal. Seconds on 2 CPU cores in the fast setting."""
    from lightning_tda.data import DigitsDataModule
    from lightning_tda.dcor._data import fit_quietly
    from lightning_tda.models import DigitsCNN, ImageClassifier

    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup()
    models = []
    for offset, model in enumerate((model_a, model_b)):
        if model is None:
            torch.manual_seed(seed + offset)
            model = ImageClassifier(DigitsCNN())
            fit_quietly(model, datamodule, epochs=3 if fast else 8, seed=seed + offset)
        models.append(model)
    return compare_layers(models[0], models[1], datamodule.recording_dataset("val"), signal="labels",
                          progress=progress)

"""``ModelPredModule``: the set network trained on (subset, exactly trained parameters) pairs.

Loss of a batch of subsets :math:`S` with exact solutions :math:`\\theta^*(S)` and predictions
:math:`\\hat\\theta(S)` (ModelPred, Zeng et al., SaTML 2023):

.. math::

    \\mathcal{L} = \\mathrm{MSE}\\big(\\hat\\theta, \\theta^*\\big)
        + \\lambda_{\\text{global}} R_{\\text{global}} + \\lambda_{\\text{local}} R_{\\text{local}}

- **MSE** on standardised parameters (each coordinate centred and scaled by its spread over the
  training pairs, so large and small coordinates count alike).
- **Global regularisation** :math:`R_{\\text{global}}`, the first-order optimality (KKT) residual
  of the target's objective at the prediction, on the subset itself:

  .. math::  R_{\\text{global}} = \\Big\\| \\frac{\\nabla F_S(\\hat\\theta(S))}{1 + C |S|} \\Big\\|_2^2

  The exact solution of *every* subset makes this zero, whether or not the subset was sampled
  as a training pair, and it needs no solved :math:`\\theta^*`: it ties the set function to the
  learning algorithm itself (the optimality condition) rather than to the sampled pairs, which
  is why it is the global one. The division by :math:`1 + C|S|` makes subsets of every size
  count alike (the objective sums over the subset).
- **Local regularisation** :math:`R_{\\text{local}}`, utility matching: the prediction's mean
  training loss on :math:`S` should equal the exact model's,

  .. math::  R_{\\text{local}} = \\big( L_S(\\hat\\theta(S)) - L_S(\\theta^*(S)) \\big)^2,

  which anchors each sampled pair in the quantity the applications use (a model's loss), around
  that pair's solution only, hence local.

These are the two regularisers of the paper's public code (``KKT_loss_soft`` and
``utility_loss_soft``); both are batch means here (the code used norms over the batch).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_tda.modelpred.network import SetNetwork
from lightning_tda.modelpred.targets import Target


def global_regularizer(target: Target, theta: Tensor, weights: Tensor) -> Tensor:
    """Mean over subsets of the squared, size-scaled KKT residual :math:`R_{\\text{global}}`."""
    grad = target.gradient(theta, weights)
    scale = 1.0 + target.C * weights.to(theta.dtype).sum(-1)
    return ((grad / scale[:, None]) ** 2).sum(-1).mean()


def local_regularizer(target: Target, theta: Tensor, theta_star: Tensor, weights: Tensor) -> Tensor:
    """Mean over subsets of the squared training-loss gap :math:`R_{\\text{local}}`."""
    gap = target.training_loss(theta, weights) - target.training_loss(theta_star.to(theta.dtype), weights)
    return (gap**2).mean()


class ModelPredModule(L.LightningModule):
    """The set network and its loss (see the module docstring) for one target's training pool.

    Batches are ``(masks [b, n] float, theta_star [b, P])``. ``forward(masks)`` returns predicted
    parameters in the target's units.

    Args:
        target: the target on the training pool (its examples become the set elements).
        theta_mean, theta_std: per-coordinate statistics of the training pairs' solutions.
        hidden, set_features: widths of the set network.
        lambda_global, lambda_local: weights of the two regularisers (0 turns one off).
        learning_rate, weight_decay: Adam's.
        pooling: the set network's pooling, ``"sum"`` or ``"sum+mean"`` (:class:`SetNetwork`).
    """

    def __init__(
        self,
        target: Target,
        theta_mean: Tensor,
        theta_std: Tensor,
        hidden: int = 128,
        set_features: int = 128,
        lambda_global: float = 1.0,
        lambda_local: float = 1.0,
        learning_rate: float = 3e-3,
        weight_decay: float = 0.0,
        pooling: str = "sum+mean",
    ) -> None:
        super().__init__()
        for name, value in (("lambda_global", lambda_global), ("lambda_local", lambda_local), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.save_hyperparameters(ignore=["target", "theta_mean", "theta_std"])
        self.target = target
        onehot = torch.nn.functional.one_hot(target.y, target.num_classes).to(torch.float32)
        self.register_buffer("elements", torch.cat([target.x.to(torch.float32), onehot], 1))
        self.register_buffer("theta_mean", torch.as_tensor(theta_mean, dtype=torch.float32).reshape(target.num_params))
        self.register_buffer("theta_std", torch.as_tensor(theta_std, dtype=torch.float32).reshape(target.num_params).clamp_min(1e-6))
        self.network = SetNetwork(self.elements.shape[1], target.num_params, hidden, set_features, pool_size=target.n, pooling=pooling)

    def forward(self, weights: Tensor) -> Tensor:
        """Predicted parameters ``[m, P]`` of the subsets ``weights [m, n]``."""
        return self.network(weights, self.elements) * self.theta_std + self.theta_mean

    def losses(self, weights: Tensor, theta_star: Tensor) -> dict[str, Tensor]:
        """Every term of the loss, and the relative parameter error, of one batch."""
        theta = self(weights)
        mse = (((theta - theta_star) / self.theta_std) ** 2).mean()
        hp = self.hparams
        r_global = global_regularizer(self.target, theta, weights) if hp.lambda_global > 0 or not self.training else theta.new_zeros(())
        r_local = local_regularizer(self.target, theta, theta_star, weights) if hp.lambda_local > 0 or not self.training else theta.new_zeros(())
        loss = mse + hp.lambda_global * r_global + hp.lambda_local * r_local
        rel = ((theta - theta_star).norm(dim=-1) / theta_star.norm(dim=-1).clamp_min(1e-12)).mean()
        return {"loss": loss, "mse": mse, "r_global": r_global, "r_local": r_local, "relative_error": rel}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        weights, theta_star = batch
        out = self.losses(weights, theta_star)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log("train/relative_error", out["relative_error"])
        return out["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        weights, theta_star = batch
        out = self.losses(weights, theta_star)
        for name, value in out.items():
            self.log(f"val/{name}", value, prog_bar=name in ("loss", "relative_error"))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/mse"}}


__all__ = ["ModelPredModule", "global_regularizer", "local_regularizer"]

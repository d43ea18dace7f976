"""Feature transformations for counterfactual verification: callables on a batch of images.

A transformation takes a batch ``[batch, channels, height, width]`` (or ``[batch, height,
width]``) and returns a batch of the same shape: paste a patch, shift, rotate, blur, or change the
intensity. ModelDiff turns a distinguishing direction into such a transformation (the paper's
*distinguishing feature transformation*) and :func:`~lightning_tda.modeldiff.verification.verify`
checks that it moves one algorithm's predictions and not the other's. Random transformations
draw from torch's global generator; ``verify`` seeds it (and restores it afterwards), so every
model sees the same transformed inputs.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

Transformation = Callable[[Tensor], Tensor]


def _as_batch(x: Tensor) -> tuple[Tensor, bool]:
    """``x`` as ``[b, c, h, w]`` and whether a channel axis was added."""
    if not isinstance(x, Tensor):
        raise TypeError(f"a transformation takes a tensor batch of images, got {type(x).__name__}")
    if x.ndim == 3:
        return x.unsqueeze(1), True
    if x.ndim == 4:
        return x, False
    raise ValueError(f"a batch of images must be [batch, channels, height, width] or [batch, height, width], got {tuple(x.shape)}")


def square_patch(size: int = 2, value: float = 1.0, channels: int = 1) -> Tensor:
    """A filled square ``[channels, size, size]``."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return torch.full((channels, size, size), float(value))


def checker_patch(size: int = 3, low: float = 0.0, high: float = 1.0, channels: int = 1) -> Tensor:
    """A checkerboard ``[channels, size, size]`` (``high`` on the top-left cell)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    grid = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2 == 0
    return torch.where(grid, high, low).float().expand(channels, size, size).clone()


class PastePatch:
    """Paste ``patch`` ``[channels, h, w]`` (or ``[h, w]``) into every image, at ``position``
    ``(row, column)`` of its top-left corner, or at a uniformly random position per image
    (``"random"``). Negative coordinates count from the bottom/right edge."""

    def __init__(self, patch: Tensor, position: tuple[int, int] | Literal["random"] = (0, 0)) -> None:
        patch = torch.as_tensor(patch, dtype=torch.float32)
        if patch.ndim == 2:
            patch = patch.unsqueeze(0)
        if patch.ndim != 3:
            raise ValueError(f"patch must be [channels, h, w] or [h, w], got shape {tuple(patch.shape)}")
        if position != "random" and not (isinstance(position, (tuple, list)) and len(position) == 2):
            raise ValueError(f"position must be (row, column) or 'random', got {position!r}")
        self.patch, self.position = patch, position

    def _corner(self, height: int, width: int) -> tuple[int, int]:
        ph, pw = self.patch.shape[-2:]
        if ph > height or pw > width:
            raise ValueError(f"a {ph}x{pw} patch does not fit into {height}x{width} images")
        if self.position == "random":
            row = int(torch.randint(0, height - ph + 1, ()))
            col = int(torch.randint(0, width - pw + 1, ()))
            return row, col
        row, col = (int(p) for p in self.position)  # type: ignore[union-attr]
        row, col = row % height if row < 0 else row, col % width if col < 0 else col
        if row + ph > height or col + pw > width:
            raise ValueError(f"a {ph}x{pw} patch at {self.position} does not fit into {height}x{width} images")
        return row, col

    def __call__(self, x: Tensor) -> Tensor:
        batch, squeezed = _as_batch(x)
        out = batch.clone()
        patch = self.patch.to(out.dtype)
        if patch.shape[0] not in (1, out.shape[1]):
            raise ValueError(f"the patch has {patch.shape[0]} channels, the images {out.shape[1]}")
        ph, pw = patch.shape[-2:]
        fixed = None if self.position == "random" else self._corner(*out.shape[-2:])
        for i in range(out.shape[0]):
            row, col = fixed if fixed is not None else self._corner(*out.shape[-2:])
            out[i, :, row : row + ph, col : col + pw] = patch
        return out.squeeze(1) if squeezed else out

    def __repr__(self) -> str:
        return f"PastePatch({tuple(self.patch.shape[-2:])}, position={self.position})"


class Shift:
    """Shift every image by ``(rows, columns)`` pixels (down/right positive), filling with
    ``fill``."""

    def __init__(self, rows: int = 0, columns: int = 1, fill: float = 0.0) -> None:
        self.rows, self.columns, self.fill = int(rows), int(columns), float(fill)

    def __call__(self, x: Tensor) -> Tensor:
        batch, squeezed = _as_batch(x)
        h, w = batch.shape[-2:]
        out = torch.full_like(batch, self.fill)
        r, c = self.rows, self.columns
        if abs(r) < h and abs(c) < w:
            out[..., max(r, 0) : h + min(r, 0), max(c, 0) : w + min(c, 0)] = batch[..., max(-r, 0) : h - max(r, 0), max(-c, 0) : w - max(c, 0)]
        return out.squeeze(1) if squeezed else out

    def __repr__(self) -> str:
        return f"Shift(rows={self.rows}, columns={self.columns})"


def _affine(batch: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Rotate:
    """Rotate every image by ``degrees`` (counter-clockwise) about its centre, bilinear, zeros
    outside; with ``random=True`` each image by a uniform angle in ``[-degrees, degrees]``."""

    def __init__(self, degrees: float = 15.0, random: bool = False) -> None:
        self.degrees, self.random = float(degrees), random

    def __call__(self, x: Tensor) -> Tensor:
        batch, squeezed = _as_batch(x)
        b = batch.shape[0]
        if self.random:
            angles = (torch.rand(b) * 2 - 1) * self.degrees
        else:
            angles = torch.full((b,), self.degrees)
        radians = angles * math.pi / 180
        cos, sin = torch.cos(radians), torch.sin(radians)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        out = _affine(batch, theta.to(batch.dtype))
        return out.squeeze(1) if squeezed else out

    def __repr__(self) -> str:
        return f"Rotate({'+-' if self.random else ''}{self.degrees:g} degrees)"


class GaussianBlur:
    """Blur every image with a Gaussian of standard deviation ``sigma`` pixels (zero padding,
    kernel of ``2 * ceil(2 * sigma) + 1`` pixels)."""

    def __init__(self, sigma: float = 1.0) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def __call__(self, x: Tensor) -> Tensor:
        batch, squeezed = _as_batch(x)
        radius = math.ceil(2 * self.sigma)
        grid = torch.arange(-radius, radius + 1, dtype=batch.dtype)
        kernel = torch.exp(-(grid**2) / (2 * self.sigma**2))
        kernel = kernel / kernel.sum()
        c = batch.shape[1]
        out = F.conv2d(batch, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
        out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)
        return out.squeeze(1) if squeezed else out

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma:g})"


class ChangeIntensity:
    """``scale * x + offset``, clamped to ``clamp`` (``None``: no clamp)."""

    def __init__(self, scale: float = 1.0, offset: float = 0.0, clamp: tuple[float, float] | None = (0.0, 1.0)) -> None:
        self.scale, self.offset, self.clamp = float(scale), float(offset), clamp

    def __call__(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"a transformation takes a tensor batch of images, got {type(x).__name__}")
        out = x * self.scale + self.offset
        return out.clamp(*self.clamp) if self.clamp is not None else out

    def __repr__(self) -> str:
        return f"ChangeIntensity(scale={self.scale:g}, offset={self.offset:g})"


class Compose:
    """Apply ``transformations`` in order."""

    def __init__(self, transformations: Sequence[Transformation]) -> None:
        self.transformations = list(transformations)

    def __call__(self, x: Tensor) -> Tensor:
        for t in self.transformations:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return " then ".join(map(repr, self.transformations))


class PerImage:
    """Apply a batch transformation to one image ``[channels, h, w]`` (a dataset's ``transform``),
    with probability ``probability``: training-time augmentation from the transformations above."""

    def __init__(self, transformation: Transformation, probability: float = 1.0) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        self.transformation, self.probability = transformation, probability

    def __call__(self, image: Tensor) -> Tensor:
        if self.probability < 1.0 and float(torch.rand(())) >= self.probability:
            return image
        return self.transformation(image.unsqueeze(0))[0]

    def __repr__(self) -> str:
        return f"PerImage({self.transformation!r}, p={self.probability:g})"


class RandomShift:
    """Shift each image by a uniform random ``(rows, columns)`` in ``[-max_shift, max_shift]``."""

    def __init__(self, max_shift: int = 1) -> None:
        self.max_shift = int(max_shift)

    def __call__(self, x: Tensor) -> Tensor:
        batch, squeezed = _as_batch(x)
        out = torch.stack([
            Shift(*torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist())(image.unsqueeze(0))[0] for image in batch
        ])
        return out.squeeze(1) if squeezed else out

    def __repr__(self) -> str:
        return f"RandomShift(+-{self.max_shift})"


__all__ = [
    "ChangeIntensity", "Compose", "GaussianBlur", "PastePatch", "PerImage", "RandomShift", "Rotate", "Shift",
    "Transformation", "checker_patch", "square_patch",
]

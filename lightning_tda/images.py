"""Images as analyses and reports show them: any tensor or array to ``uint8`` pixels.

It lives below the analyses and the reporting layer, so both can use it and imports point down.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

ImageLike = Tensor | np.ndarray


def to_uint8_image(image: ImageLike) -> np.ndarray:
    """Convert one image to ``uint8`` [H, W] (grey) or [H, W, 3|4] for PNG files and W&B.

    Accepts tensors or arrays shaped [H, W], [C, H, W] or [H, W, C] with C in 1, 3, 4 (where both
    readings fit, channels first for tensors and last for numpy arrays). ``uint8``
    passes through; bool becomes 0/255; floats in [0, 1] are scaled by 255, other floats are
    min-max scaled per image (so a normalised input still shows).
    """
    channels_first = isinstance(image, Tensor)  # each library's convention, when the shape is ambiguous
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        if array.shape[-1] not in (1, 3, 4) or channels_first:
            array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            "an image must be [H, W], [C, H, W] or [H, W, C] with C in (1, 3, 4), "
            f"got shape {array.shape}"
        )
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("an image has non-finite values (NaN or inf)")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return np.round(array * 255).astype(np.uint8)

"""Forward hooks shared by the dCor penalty and the layer comparison: find a layer by name (a
clear error listing the layers there are), and capture a layer's output or a module's inputs."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["InputCapture", "OutputCapture", "find_layer", "first_tensor"]


def first_tensor(output: Any, where: str) -> Tensor:
    """A layer's output as one tensor: itself, or the first tensor of a tuple or list output."""
    if isinstance(output, (tuple, list)):
        output = next((o for o in output if isinstance(o, Tensor)), None)
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{where} returned {type(output).__name__}, not a tensor; hook a layer whose "
            "output is a tensor (or a tuple holding one)"
        )
    return output


class OutputCapture:
    """Forward hook: keeps the output of the last call while enabled (the first tensor of a
    tuple output)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.enabled = False
        self.value: Tensor | None = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.enabled:
            return
        self.value = first_tensor(output, self.where)

    def take(self) -> Tensor:
        if self.value is None:
            raise RuntimeError(
                f"{self.where} was not called during the training step, so there are no features "
                "to penalise; choose a layer the forward pass uses"
            )
        value, self.value = self.value, None
        return value


class InputCapture:
    """Forward pre-hook on the wrapped module: the positional and keyword arguments of its last
    call while enabled (the reference models are run on them)."""

    def __init__(self) -> None:
        self.enabled = False
        self.value: tuple[tuple, dict] | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.enabled:
            self.value = (args, kwargs)


def find_layer(root: nn.Module, name: str, what: str) -> nn.Module:
    """The submodule of ``root`` named ``name`` (as in ``named_modules()``); a ValueError that
    lists the layers there are otherwise. ``what`` names ``root`` in the message."""
    names = [n for n, _ in root.named_modules()]
    if not isinstance(name, str) or name not in names:
        shown = ", ".join(repr(n) for n in names[:80])
        more = f" and {len(names) - 80} more" if len(names) > 80 else ""
        raise ValueError(
            f"{what} has no layer {name!r}; the layers it has are: {shown}{more} "
            "('' is the whole module's output)"
        )
    return root.get_submodule(name)

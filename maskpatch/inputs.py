"""Checks of what callers hand to maskpatch's functions: each raises an error naming expected and found."""

from __future__ import annotations

from collections.abc import Collection

from torch import Tensor, nn

from .errors import PolicyError, UnsupportedModelError

__all__ = ["require_module", "require_tensor"]


def require_tensor(value: object, *, name: str, where: str, dims: Collection[int] | None = None) -> Tensor:
    """Return ``value`` if it is a ``torch.Tensor`` (with one of ``dims`` dimensions); raise :class:`PolicyError` otherwise.

    A list, a NumPy array or None is refused rather than guessed at: the message names ``name``,
    ``where`` it was passed, what was expected and what was found.
    """
    # Called per batch (output_mask): the message is only built when it is raised.
    if not isinstance(value, Tensor):
        raise PolicyError(f"{where}: expected {name} to be a torch.Tensor{_dims(dims)}, but got {_describe(value)}")
    if dims is not None and value.dim() not in dims:
        raise PolicyError(
            f"{where}: expected {name} to be a torch.Tensor{_dims(dims)}, but got shape {tuple(value.shape)}"
        )
    return value


def _dims(dims: Collection[int] | None) -> str:
    return "" if dims is None else f" with {' or '.join(map(str, sorted(dims)))} dimensions"


def require_module(model: object, *, where: str) -> nn.Module:
    """Return ``model`` if it is a ``torch.nn.Module``; raise :class:`UnsupportedModelError` otherwise."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"{where}: expected a torch.nn.Module, but got {_describe(model)}")
    return model


def _describe(value: object) -> str:
    kind = type(value)
    return "None" if value is None else f"{kind.__module__}.{kind.__qualname__}".removeprefix("builtins.")

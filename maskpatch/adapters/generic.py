"""The generic path: a module that prepends a known number of tokens, without PEFT.

Some modules prepend positions of their own: learned memory or register tokens, a soft prompt
written by hand, ``prepend_embeds`` in x-transformers. Their token-level outputs have ``N + M``
positions for an ``N``-long input, exactly like a PEFT prompt-learning model, but nothing in the
module says what ``M`` is. The user states it::

    handle = maskpatch.apply(module, policy="strip", prepended_tokens=4)

A forward hook on ``module`` then applies the policy to what the module returns:

* ``strip`` cuts the first ``M`` positions (views) from a tensor output, or from
  ``last_hidden_state``, every ``hidden_states[i]`` and both axes of every ``attentions[i]`` of a
  dict or ``ModelOutput``, so user code lines up with its own ``N``-long mask;
* ``extend`` and ``ignore`` leave the output as it is (``N + M`` positions);
  :func:`prepended_mask` returns the mask that lines up with it: ``M`` attending entries in front
  (``extend``) or ``M`` non-attending ones (``ignore``).

The module itself is responsible for masking its own prepended tokens inside; maskpatch only
lines the outputs and the caller's mask up again. This adapter is never chosen automatically:
``prepended_tokens`` selects it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping
from typing import Any, cast

from torch import Tensor, nn

from ..conventions import MaskConvention
from ..drift import Policy, prefix_mask, strip_positions
from ..errors import AlreadyPatchedError, DriftError, PolicyError, UnsupportedModelError
from ..handle import HookSpec, iter_hooks
from ..hooks import InstallRecord, MaskpatchHook

__all__ = [
    "PrependedOutputHook",
    "PrependedTokensAdapter",
    "check_same_count",
    "installed_count",
    "prepended_mask",
    "validate_count",
]

#: Keys of a dict or ``ModelOutput`` that hold token-level outputs, and how each is cut.
SEQUENCE_KEYS = ("last_hidden_state", "hidden_states")
ATTENTION_KEYS = ("attentions",)


def validate_count(count: object) -> int:
    """Return ``count`` if it is a positive ``int``; raise :class:`PolicyError` otherwise."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise PolicyError(f"expected prepended_tokens to be a positive int, but got {count!r}")
    return count


class PrependedTokensAdapter:
    """The adapter for a module that prepends ``count`` tokens (built per install, never registered)."""

    name = "prepended-tokens"
    requires = {"torch": ">=2.4"}
    optional: dict[str, str] = {}

    def __init__(self, count: int) -> None:
        self.count = validate_count(count)

    def matches(self, model: object) -> bool:
        return isinstance(model, nn.Module)

    def plan(self, model: nn.Module, record: InstallRecord) -> list[HookSpec]:
        return [HookSpec(model, PrependedOutputHook(record, self.count))]


class PrependedOutputHook(MaskpatchHook):
    """Forward hook on the module the user named: apply the policy to its ``count`` leading positions."""

    def __init__(self, record: InstallRecord, count: int) -> None:
        super().__init__(record)
        self.count = count

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        where = f"{type(module).__name__} (prepended_tokens={self.count})"
        if isinstance(output, Tensor):
            _check_length(output, self.count, where=where)
            return strip_positions(output, self.count) if self.record.policy == "strip" else None
        if isinstance(output, Mapping) and any(output.get(key) is not None for key in SEQUENCE_KEYS):
            _check_length(_first_sequence(output), self.count, where=where)
            return _strip_mapping(output, self.count) if self.record.policy == "strip" else None
        if self.record.policy == "strip":
            raise UnsupportedModelError(
                f"{where}: expected a tensor, or a dict or ModelOutput with last_hidden_state or hidden_states, "
                f"but the module returned {type(output).__qualname__}; policy 'strip' has nothing it can cut"
            )
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.record!r}, count={self.count})"


def _first_sequence(output: Mapping[str, Any]) -> Tensor:
    hidden: Tensor | None = output.get("last_hidden_state")
    last: Tensor = output["hidden_states"][-1] if hidden is None else hidden
    return last


def _check_length(tokens: Tensor, count: int, *, where: str) -> None:
    if tokens.dim() < 2 or tokens.shape[1] < count:
        shape = tuple(tokens.shape)
        raise DriftError(
            f"{where}: expected a batch-first token-level output with at least {count} positions, but got shape "
            f"{shape}; maskpatch does not repair an excess it cannot explain"
        )


def _strip_mapping(output: Mapping[str, Any], count: int) -> Mapping[str, Any]:
    """Return a shallow copy of ``output`` with ``count`` leading positions cut from every token-level entry."""
    repaired = cast("MutableMapping[str, Any]", copy.copy(output))  # a dict or a ModelOutput
    for key in SEQUENCE_KEYS + ATTENTION_KEYS:
        value = output.get(key)
        if value is None:
            continue
        if key in ATTENTION_KEYS:
            repaired[key] = type(value)(
                strip_positions(strip_positions(a, count, dim=-1), count, dim=-2) for a in value
            )
        elif isinstance(value, Tensor):
            repaired[key] = strip_positions(value, count)
        else:
            repaired[key] = type(value)(strip_positions(h, count) for h in value)
    return repaired


def _installed_hook(model: nn.Module) -> PrependedOutputHook | None:
    return next((hook for _, _, hook in iter_hooks(model) if isinstance(hook, PrependedOutputHook)), None)


def installed_count(model: nn.Module) -> int | None:
    """Return the ``prepended_tokens`` ``model`` is patched with, or None when it has no such install."""
    hook = _installed_hook(model)
    return None if hook is None else hook.count


def check_same_count(model: nn.Module, count: int | None) -> None:
    """Raise :class:`AlreadyPatchedError` when ``count`` asks for another install than the one on ``model``."""
    if count is None:
        return
    installed = installed_count(model)
    if installed != count:
        found = "another adapter" if installed is None else f"prepended_tokens={installed}"
        raise AlreadyPatchedError(
            f"{type(model).__name__} is already patched with {found}, but prepended_tokens={count} was asked for; "
            "remove the first install (handle.remove() or maskpatch.remove(model)) before patching again"
        )


def prepended_mask(module: nn.Module, mask: Tensor, *, convention: MaskConvention = MaskConvention.ONES) -> Tensor:
    """Return the mask (in ``convention``, ``ONES`` by default: 1 attends) that lines up with ``module``'s outputs.

    ``module`` must be patched with ``maskpatch.apply(module, policy=..., prepended_tokens=M)``.
    ``mask`` is the caller's ``(B, N)`` mask. Under ``extend`` the result has ``M`` leading
    attending entries, under ``ignore`` ``M`` non-attending ones (``(B, M + N)`` either way), and
    under ``strip``, whose outputs have ``N`` positions, it is ``mask`` itself. Dtype and device
    are ``mask``'s; ``mask`` is not modified::

        mask  1 1 0     extend, M=2: 1 1 | 1 1 0     ignore: 0 0 | 1 1 0     strip: 1 1 0

    Raises :class:`UnsupportedModelError` when ``module`` has no ``prepended_tokens`` install and
    :class:`PolicyError` when ``mask`` is not 2-D. (:func:`maskpatch.output_mask` is the same for
    a patched PeftModel.)
    """
    hook = _installed_hook(module)
    if hook is None:
        raise UnsupportedModelError(
            f"expected a module patched with maskpatch.apply(..., prepended_tokens=M), but {type(module).__name__} "
            "has no such install"
        )
    if mask.dim() != 2:
        raise PolicyError(f"expected a 2-D (batch, tokens) mask, but got shape {tuple(mask.shape)}")
    policy: Policy = hook.record.policy
    if policy == "strip":
        return mask
    return prefix_mask(mask, hook.count, attend=policy == "extend", convention=convention)

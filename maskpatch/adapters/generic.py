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
lines the outputs and the caller's mask up again. One exception: torch's ``nn.TransformerEncoder``,
``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` inside ``module`` that get the
caller's ``N``-long ``key_padding_mask`` for an ``N + M`` sequence get ``M`` attending entries in
front of it (:mod:`maskpatch.adapters.key_padding`). This adapter is registered (as
``"prepended-tokens"``) like every other but never chosen automatically (``matches`` is always
false: nothing in a module says it prepends): ``prepended_tokens=M`` selects it, with that count
(:meth:`PrependedTokensAdapter.with_count`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping
from typing import Any, cast

from torch import Tensor, nn

from ..conventions import MaskConvention
from ..drift import Policy, prefix_mask, strip_positions
from ..errors import AlreadyPatchedError, DriftError, PolicyError, UnsupportedModelError
from ..handle import HookSpec, find_record, iter_hooks
from ..hooks import ForwardHook, InstallRecord
from ..inputs import require_module, require_tensor
from .key_padding import key_padding_specs

__all__ = [
    "NAME",
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


#: The largest ``prepended_tokens``: a tensor dimension is a signed 64-bit integer in torch.
MAX_COUNT = 2**63 - 1


def validate_count(count: object) -> int:
    """Return ``count`` if it is an ``int`` in ``1..MAX_COUNT``; raise :class:`PolicyError` otherwise."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        shown = repr(count) if len(repr(count)) <= 40 else f"{repr(count)[:20]}... ({type(count).__qualname__})"
        raise PolicyError(f"expected prepended_tokens to be a positive int (at most 2**63 - 1), but got {shown}")
    return count


#: The registry name of the generic adapter, which ``prepended_tokens=M`` selects.
NAME = "prepended-tokens"


class PrependedTokensAdapter:
    """The adapter for a module that prepends ``count`` tokens.

    The registered instance has no count (``count`` None) and matches nothing;
    ``maskpatch.apply(module, prepended_tokens=M)`` plans with :meth:`with_count` ``(M)``.
    """

    name = NAME
    requires = {"torch": ">=2.4"}
    optional: dict[str, str] = {}

    def __init__(self, count: int | None = None) -> None:
        self.count = None if count is None else validate_count(count)

    def with_count(self, count: int) -> PrependedTokensAdapter:
        """Return an adapter like this one for a module that prepends ``count`` tokens."""
        return type(self)(count)

    def matches(self, model: object) -> bool:
        return False  # never chosen automatically: nothing in a module says it prepends tokens

    def plan(self, model: nn.Module, record: InstallRecord) -> list[HookSpec]:
        if self.count is None:
            raise PolicyError(
                "the prepended-tokens adapter needs the number of tokens the module prepends: "
                "maskpatch.apply(module, prepended_tokens=M)"
            )
        # torch key-padding modules inside get their mask extended (see maskpatch.adapters.key_padding).
        return [HookSpec(model, PrependedOutputHook(record, self.count)), *key_padding_specs(model, record, self.count)]

    def output_mask(
        self,
        model: nn.Module,
        record: InstallRecord,
        attention_mask: Tensor,
        *,
        convention: MaskConvention = MaskConvention.ONES,
    ) -> Tensor:
        """The mask that lines up with the outputs of ``record``'s install (see :func:`prepended_mask`)."""
        require_tensor(attention_mask, name="mask", where="prepended_mask", dims=(2,))
        policy: Policy = record.policy
        if policy == "strip":
            return attention_mask
        count = self.count if self.count is not None else _record_count(record, model)
        return prefix_mask(attention_mask, count, attend=policy == "extend", convention=convention)


class PrependedOutputHook(ForwardHook):
    """Forward hook on the module the user named: apply the policy to its ``count`` leading positions."""

    def __init__(self, record: InstallRecord, count: int) -> None:
        super().__init__(record)
        self.count = count

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        where = f"{type(module).__name__} (prepended_tokens={self.count})"
        if isinstance(output, Tensor):
            _check_length(output, _input_length(args, kwargs, where=where), self.count, where=f"{where} output")
            return strip_positions(output, self.count) if self.record.policy == "strip" else None
        if isinstance(output, Mapping) and any(output.get(key) is not None for key in SEQUENCE_KEYS):
            _check_mapping(output, _input_length(args, kwargs, where=where), self.count, where=where)
            return _strip_mapping(output, self.count) if self.record.policy == "strip" else None
        if self.record.policy == "strip":
            raise UnsupportedModelError(
                f"{where}: expected a tensor, or a dict or ModelOutput with last_hidden_state or hidden_states, "
                f"but the module returned {type(output).__qualname__}; policy 'strip' has nothing it can cut"
            )
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.record!r}, count={self.count})"


#: Keyword arguments that carry the token sequence, tried in this order when no tensor is positional.
INPUT_KEYS = ("input_ids", "inputs_embeds", "x", "src", "input", "hidden_states")


def _input_length(args: tuple[Any, ...], kwargs: Mapping[str, Any], *, where: str) -> int:
    """Return ``N``, the positions of the input the module saw: axis 1 of its first batch-first tensor.

    That is the first positional tensor argument with at least 2 dimensions, else the first of
    :data:`INPUT_KEYS` given as a keyword. Raises :class:`DriftError` when there is none, since
    the output's length could then not be checked.
    """
    first = next((a for a in args if isinstance(a, Tensor) and a.dim() >= 2), None)
    if first is None:
        first = next((v for k in INPUT_KEYS if isinstance(v := kwargs.get(k), Tensor) and v.dim() >= 2), None)
    if first is None:
        raise DriftError(
            f"{where}: expected a (batch, tokens, ...) tensor input (positional, or one of {', '.join(INPUT_KEYS)}), "
            "but found none, so the output's length cannot be checked against the input's"
        )
    return int(first.shape[1])


def _check_length(tokens: Tensor, n: int, count: int, *, where: str, dims: tuple[int, ...] = (1,)) -> None:
    """Raise :class:`DriftError` unless ``tokens`` has exactly ``n + count`` positions on each axis of ``dims``."""
    for dim in dims:
        found = tokens.shape[dim] if tokens.dim() >= 2 and -tokens.dim() <= dim < tokens.dim() else None
        if found != n + count:
            shape = tuple(tokens.shape)
            raise DriftError(
                f"{where}: the input has {n} positions and the module prepends {count}, so a batch-first output "
                f"with {n + count} positions on axis {dim} was expected, but got shape {shape}; maskpatch does not "
                "repair an excess it cannot explain (a wrong prepended_tokens, or a sequence-first module?)"
            )


def _check_mapping(output: Mapping[str, Any], n: int, count: int, *, where: str) -> None:
    """Check every token-level entry of a dict or ``ModelOutput`` (see :func:`_check_length`)."""
    for key in SEQUENCE_KEYS + ATTENTION_KEYS:
        value = output.get(key)
        if value is None:
            continue
        dims = (-1, -2) if key in ATTENTION_KEYS else (1,)
        for i, tensor in enumerate([value] if isinstance(value, Tensor) else value):
            _check_length(tensor, n, count, where=f"{where} output {key!r}[{i}]", dims=dims)


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
    record = find_record(model)  # O(hooks) for the module apply was called on
    if record is not None and record.adapter == NAME:
        hook = next((h for h in record.hooks() if isinstance(h, PrependedOutputHook)), None)
        if hook is not None:
            return hook
    return next((hook for _, _, hook in iter_hooks(model) if isinstance(hook, PrependedOutputHook)), None)


def _record_count(record: InstallRecord, model: nn.Module) -> int:
    """The count of ``record``'s prepended-tokens install: from its hooks, or (a copy) found in ``model``."""
    hook = next((h for h in record.hooks() if isinstance(h, PrependedOutputHook)), None)
    if hook is None:
        found = (h for _, _, h in iter_hooks(model) if isinstance(h, PrependedOutputHook) and h.record is record)
        hook = next(found, None)
    if hook is None:
        raise UnsupportedModelError(f"expected a prepended_tokens install in {type(model).__name__}, but found none")
    return hook.count


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
    hook = _installed_hook(require_module(module, where="prepended_mask"))
    if hook is None:
        raise UnsupportedModelError(
            f"expected a module patched with maskpatch.apply(..., prepended_tokens=M), but {type(module).__name__} "
            "has no such install"
        )
    return PrependedTokensAdapter(hook.count).output_mask(module, hook.record, mask, convention=convention)

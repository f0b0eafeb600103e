"""Known limits: combinations maskpatch cannot make right, reported instead of passed over in silence.

Each limit is one :class:`Limit` (a stable name, and a message that names the case and what to
do). :func:`report` warns with a :class:`~maskpatch.errors.MaskpatchWarning` once per install, or
raises :class:`~maskpatch.errors.KnownLimitError` when the install is strict
(``maskpatch.apply(model, strict=True)``, or ``MASKPATCH_STRICT=1`` under auto-enable).

Most limits show only at forward time, in a batch that runs into them (a left-padded batch, a
padded length past a sliding window), so they are checked there, by the hooks of the install:

* :class:`PaddingLimitHook`, a pre-hook on the PEFT base model, for the models whose
  :class:`~maskpatch.positions.PositionScheme` names a left-padding limit (T5's relative bias) or a
  sliding window. It costs nothing per forward on other models: it is not registered there. On
  the others it reads the mask on the host (one sync) only when the batch could run into the
  limit, and not at all once the limit was reported.
* the sentence-transformers output hook, for a part-model install (``apply(model[0])``) that
  cannot see a ``Pooling(include_prompt=False)`` after it.

What can be fixed is fixed instead: ``weightedmean`` pooling under ``extend`` with left padding
gets its weights counted as for the text alone (see
:class:`maskpatch.adapters.sentence_transformers.pooling.WeightedMeanOrderHook`), and under
``ignore`` a sentence-transformers ``Pooling`` that reads positions by column (before 6.2) sees
the real columns only (:class:`~maskpatch.adapters.sentence_transformers.pooling.PoolingRealColumnsHook`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .errors import KnownLimitError, MaskpatchWarning
from .hooks import ForwardPreHook, InstallRecord
from .layout import active_layout, is_peft_model
from .positions import PositionScheme, position_scheme

__all__ = [
    "LEFT_PADDING",
    "LIMITS",
    "PART_MODEL_POOLING",
    "SLIDING_WINDOW",
    "Limit",
    "PaddingLimitHook",
    "ensure_limit_hook",
    "has_pads_before_tokens",
    "limit_hook_for",
    "report",
]


@dataclass(frozen=True)
class Limit:
    """One known limit: ``name`` (stable, for filters and strict mode) and what to do about it."""

    name: str
    remedy: str


LEFT_PADDING = Limit(
    "left-padding",
    "pad on the right (tokenizer.padding_side = 'right'), or encode texts one at a time",
)
SLIDING_WINDOW = Limit(
    "sliding-window",
    "pad on the right, encode texts one at a time, or keep M + the padded length within the window",
)
PART_MODEL_POOLING = Limit(
    "part-model-pooling",
    "patch the whole model (maskpatch.apply(model), not apply(model[0])) so that maskpatch reaches its Pooling",
)
LIMITS = (LEFT_PADDING, SLIDING_WINDOW, PART_MODEL_POOLING)


def report(record: InstallRecord, limit: Limit, case: str, *, stacklevel: int = 3) -> None:
    """Warn about ``limit`` (``case`` says what was found) once per install; raise under ``record.strict``.

    Raises :class:`KnownLimitError` when the install is strict, every time the case occurs.
    """
    message = f"maskpatch known limit {limit.name!r}: {case}; {limit.remedy}"
    if record.strict:
        raise KnownLimitError(message)
    if limit.name in record.reported:
        return
    record.reported.add(limit.name)
    warnings.warn(message, MaskpatchWarning, stacklevel=stacklevel)


def has_pads_before_tokens(mask: Tensor) -> bool:
    """Return whether a row of ``mask`` (``ONES``: 1 attends) has a non-attending entry before an attending one.

    That is left padding (or a hole), behind any virtual-token entries in front; right padding is
    not. Reads the mask on the host (one sync)::

        1 1 | 1 1 1 0 0   ->  False   (M = 2, right padding)
        1 1 | 0 0 1 1 1   ->  True    (M = 2, left padding)
    """
    attends = mask != 0
    return bool((attends[:, 1:] & ~attends[:, :-1]).any())


class PaddingLimitHook(ForwardPreHook):
    """Pre-hook on a PEFT base model whose numbering left padding can break (see :mod:`maskpatch.limits`).

    ``reason`` (a left-padding limit of the architecture) and ``window`` (the narrowest sliding
    window) come from the model's :class:`~maskpatch.positions.PositionScheme` at install. The
    hook changes nothing; it reports the limit the first time a batch runs into it.
    """

    def __init__(self, record: InstallRecord, peft_model: nn.Module, *, reason: str | None, window: int | None) -> None:
        super().__init__(record)
        self.peft_model = peft_model
        self.reason = reason
        self.window = window

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # The hot path: no message is formatted, and the mask is not read on the host, unless the
        # batch can still run into a limit that is not yet reported (or the install is strict).
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            return
        length = mask.shape[1]
        limit = self._limit_for(length)
        if limit is None or (limit.name in self.record.reported and not self.record.strict):
            return
        if active_layout(self.peft_model).adds_positions and has_pads_before_tokens(mask):
            report(self.record, limit, f"{type(module).__name__}: {self._case(limit, length)}", stacklevel=4)

    def _limit_for(self, length: int) -> Limit | None:
        if self.reason is not None:
            return LEFT_PADDING
        if self.window is not None and length > self.window:
            return SLIDING_WINDOW
        return None

    def _case(self, limit: Limit, length: int) -> str:
        if limit is LEFT_PADDING:
            return f"a left-padded batch with virtual tokens is not batch invariant ({self.reason})"
        return (
            f"a left-padded batch of {length} positions (virtual tokens included) is longer than the "
            f"attention window of {self.window}, so the pads push tokens out of each other's window"
        )


def limit_hook_for(
    peft_model: Any, record: InstallRecord, scheme: PositionScheme | None = None
) -> PaddingLimitHook | None:
    """Return the :class:`PaddingLimitHook` ``peft_model.base_model`` needs, or None (changes nothing).

    None when ``peft_model`` is not a PeftModel, when its base model already carries one, or when
    its architecture has no padding limit (most: their numbering is repaired by position ids).
    """
    if not is_peft_model(peft_model):
        return None
    base = peft_model.base_model
    if any(isinstance(h, PaddingLimitHook) for h in base._forward_pre_hooks.values()):
        return None
    scheme = position_scheme(base) if scheme is None else scheme
    if scheme.left_padding_limit is None and scheme.sliding_window is None:
        return None
    return PaddingLimitHook(record, peft_model, reason=scheme.left_padding_limit, window=scheme.sliding_window)


def ensure_limit_hook(peft_model: Any, record: InstallRecord) -> bool:
    """Register the :class:`PaddingLimitHook` that :func:`limit_hook_for` says is missing; return whether it did.

    Never after ``record``'s install was removed (:meth:`InstallRecord.register`).
    """
    hook = limit_hook_for(peft_model, record)
    return hook is not None and record.register(peft_model.base_model, hook)

"""sentence-transformers 3.3 - 6.1 extend the attention mask inline themselves.

Those releases' ``Transformer.forward`` prepends ``active_peft_config.num_virtual_tokens`` ones to
``features["attention_mask"]`` whenever its model is a PEFT prompt-learning model (3.3 - 5.3:
``PeftModelForFeatureExtraction`` only; 5.4 - 6.1: any ``PeftModel``), and writes the result into
the caller's features dict. PR #3975 removed it in 6.2. Its bugs: prefix tuning and Cartridge
(which add no positions) and ``disable_adapter()`` get an extended mask anyway, so padding is
pooled; a features dict forwarded twice is extended twice and crashes; and only ``extend`` is
possible.

maskpatch therefore measures drift against the mask the *caller* passed in: a pre-hook hands
sentence-transformers a copy of the features dict (so the caller's stays as it was), and the
output hook takes the caller's ``N`` columns back out of the mask before repairing under the
policy. Learned from the installed version, and each extension is checked against the width
those releases add.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor

from ..errors import DriftError
from .versions import in_range, installed_version

__all__ = ["INLINE_RANGE", "caller_mask", "pooling_reads_by_column", "st_extends_mask_inline"]

#: The sentence-transformers releases that extend the mask inline.
INLINE_RANGE = ">=3.3,<6.2"


@functools.lru_cache(maxsize=1)
def st_extends_mask_inline() -> bool:
    """Return whether the installed sentence-transformers extends the mask inline (3.3 - 6.1)."""
    version = installed_version("sentence-transformers")
    return version is not None and in_range(version, INLINE_RANGE)


def pooling_reads_by_column() -> bool:
    """Return whether the installed sentence-transformers' ``Pooling`` reads positions by column (before 6.2).

    ``weightedmean`` weighs by column index before 6.2, ``cls`` takes column 0 before 5.5 and
    ``include_prompt=False`` zeroes the first columns before 5.3. Under ``ignore`` the M excluded
    virtual-token columns in front would then shift what they read, so maskpatch hands that
    ``Pooling`` the real columns only (:class:`~maskpatch.adapters.sentence_transformers.PoolingRealColumnsHook`).
    """
    version = installed_version("sentence-transformers")
    return version is not None and in_range(version, "<6.2")


def _inline_width(inner: Any) -> int:
    """The number of ones those releases prepend for ``inner`` (their own condition, read the same way)."""
    config = getattr(inner, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    return int(config.num_virtual_tokens)


def caller_mask(mask: Tensor, input_ids: Any, inner: Any, *, where: str) -> Tensor:
    """Return the caller's ``(B, N)`` mask (``ONES``: 1 attends) inside ``mask``, which ST may have extended inline.

    ``mask`` is the ``attention_mask`` of the ``Transformer``'s output, ``input_ids`` the
    caller's ``(B, N)`` ids and ``inner`` the model inside the ``Transformer``. Returns ``mask``
    itself when it is not wider than ``input_ids``, otherwise a view of its last ``N`` columns.
    Raises :class:`DriftError` when the extension is not the width sentence-transformers adds.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or mask.shape[1] <= input_ids.shape[1]:
        return mask
    n, extra, expected = input_ids.shape[1], mask.shape[1] - input_ids.shape[1], _inline_width(inner)
    if extra != expected:
        raise DriftError(
            f"{where}: attention_mask has {mask.shape[1]} columns but input_ids {n}; sentence-transformers "
            f"{installed_version('sentence-transformers')} extends it inline by {expected}, so {n + expected} "
            f"were expected"
        )
    return mask.narrow(1, extra, n)

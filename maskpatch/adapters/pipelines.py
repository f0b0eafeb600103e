"""transformers pipelines around a prompt-learning PeftModel.

A pipeline pairs its model's token-level outputs with its own ``N``-long view of the text: the
token-classification pipeline with offsets and the special-token mask (``N + M`` logits next to
``N`` offsets crash with an ``IndexError``), the fill-mask pipeline with the position of the mask
token in ``input_ids`` (``N + M`` logits give the scores of the wrong position, silently), the
feature-extraction pipeline returns the ``N + M`` vectors as they come. ``maskpatch.apply(pipe)``
makes every supported pipeline see ``N``-long outputs, whatever the install's policy (see
:mod:`maskpatch.adapters.hosts`); the model called directly keeps the policy asked for.

Supported pipeline classes (and what the PEFT model must be):

* ``FeatureExtractionPipeline`` (``PeftModelForFeatureExtraction``);
* ``TokenClassificationPipeline`` (``PeftModelForTokenClassification``), every
  ``aggregation_strategy``;
* ``FillMaskPipeline`` (a masked-LM base model under ``FEATURE_EXTRACTION`` or ``TOKEN_CLS``);
* ``TextClassificationPipeline`` (``PeftModelForSequenceClassification``: scores are
  sequence-level, so nothing is cut; the install makes them batch invariant with left padding);
* ``TextGenerationPipeline`` (``PeftModelForCausalLM``: ``generate`` returns the caller's tokens and
  the new ones; the install's position ids make left-padded batches equal texts alone).

Any other pipeline class raises :class:`~maskpatch.errors.UnsupportedModelError` from ``apply``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ..errors import UnsupportedModelError
from .hosts import HostAdapter, peft_kind

__all__ = ["SUPPORTED_PIPELINES", "PipelineAdapter"]

#: pipeline class name -> the PEFT task classes it is supported with.
SUPPORTED_PIPELINES: dict[str, tuple[str, ...]] = {
    "FeatureExtractionPipeline": ("PeftModelForFeatureExtraction",),
    "TokenClassificationPipeline": ("PeftModelForTokenClassification",),
    "FillMaskPipeline": ("PeftModelForFeatureExtraction", "PeftModelForTokenClassification"),
    "TextClassificationPipeline": ("PeftModelForSequenceClassification",),
    "TextGenerationPipeline": ("PeftModelForCausalLM",),
}


class PipelineAdapter(HostAdapter):
    """Patches a ``transformers.Pipeline`` whose model is a prompt-learning PeftModel (module docstring)."""

    name = "pipeline"
    host_class: ClassVar[tuple[str, str, str]] = ("transformers.pipelines.base", "Pipeline", "forward")

    def check_host(self, host: Any, model: nn.Module) -> None:
        kind = peft_kind(model)
        found = next((cls.__name__ for cls in type(host).__mro__ if cls.__name__ in SUPPORTED_PIPELINES), None)
        if found is None or kind not in SUPPORTED_PIPELINES[found]:
            supported = "; ".join(f"{p} with {' or '.join(k)}" for p, k in SUPPORTED_PIPELINES.items())
            raise UnsupportedModelError(
                f"maskpatch lines up these pipelines: {supported}; but got a {type(host).__name__} "
                f"with a {type(model).__name__}"
            )

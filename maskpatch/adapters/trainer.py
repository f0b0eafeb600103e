"""The transformers ``Trainer``: ``evaluate`` / ``predict`` with ``compute_metrics``.

Under ``extend`` and ``ignore`` a prompt-learning PeftModel returns ``N + M`` token-level logits,
while the label ids the Trainer collects are the caller's ``N``. ``compute_metrics`` then either
crashes or, when it zips predictions with labels (as the usual token-classification metrics do),
pairs each label with the prediction ``M`` positions to its left: silently wrong metrics.

``maskpatch.apply(trainer)`` patches ``trainer.model`` with the policy asked for and makes
``Trainer.evaluation_loop`` (which ``evaluate`` and ``predict`` run) see ``N``-long outputs, so
predictions and label ids have the same length under every policy (see
:mod:`maskpatch.adapters.hosts`). Training is unchanged: losses do not depend on the policy.
"""

from __future__ import annotations

from typing import ClassVar

from .hosts import HostAdapter

__all__ = ["TrainerAdapter"]


class TrainerAdapter(HostAdapter):
    """Patches a ``transformers.Trainer`` whose model is a prompt-learning PeftModel (module docstring)."""

    name = "trainer"
    host_class: ClassVar[tuple[str, str, str]] = ("transformers.trainer", "Trainer", "evaluation_loop")

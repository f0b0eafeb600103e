"""Audit mode: find where a token-level output and its mask disagree, without changing anything.

``with maskpatch.audit(model) as report:`` registers observers at the places the repair would act
(the hook sites the model's adapter plans: the sentence-transformers ``Transformer`` output, a
PeftModel's output, ...). An observer compares shapes only, never reads a value (no host-device
sync), and returns nothing, so every output stays bit-identical to the unpatched model's. The
first time a site shows drift it is recorded as a :class:`Finding` in ``report.findings`` and a
:class:`~maskpatch.errors.DriftWarning` is issued; later calls at the same site record nothing.

Observers are not maskpatch repair hooks: ``is_patched(model)`` stays false while an audit runs,
and an audit of a model that is also patched sees the repaired outputs (what code downstream
sees). Leaving the block (or :meth:`AuditSession.remove`) removes every observer exactly.
``MASKPATCH_AUTO=audit`` audits every model auto-enable would patch, into one process-wide report
(:func:`maskpatch.auto.autoenable.process_audit_report`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .adapters.peft import ENCODER_FIELDS, PeftOutputHook, as_kwargs, find_task, input_length
from .adapters.peft.tasks import task_named
from .adapters.sentence_transformers.transformer import TransformerOutputHook
from .adapters.x_transformers import XtOutputHook
from .drift import POLICIES
from .errors import DriftWarning, UnsupportedModelError
from .hooks import LOCK, InstallRecord
from .layout import VirtualLayout, active_layout
from .registry import find_adapter

__all__ = [
    "AuditHook",
    "AuditReport",
    "AuditSession",
    "Finding",
    "audit",
    "is_audited",
    "policy_effects",
    "register_observer",
]


@dataclass(frozen=True)
class Finding:
    """One site where a token-level output has more positions than its mask (recorded once).

    ``site`` is the module's qualified name inside ``model`` (``""`` for ``model`` itself, as in
    ``named_modules()``); ``output`` names the token-level output; ``output_length`` is its
    number of positions and ``mask_length`` the mask's. ``adapter``, ``peft_type`` and
    ``num_virtual_tokens`` describe the active adapter when the site was first seen (None, None, 0
    when none adds positions). ``explained`` is true when the excess is exactly that ``M``: every
    policy repairs it. ``policies`` says, for each policy, what it would do here.
    """

    model: str
    site: str
    module_type: str
    output: str
    output_length: int
    mask_length: int
    adapter: str | None
    peft_type: str | None
    num_virtual_tokens: int
    explained: bool
    policies: Mapping[str, str] = field(default_factory=dict)

    @property
    def excess(self) -> int:
        """How many positions the output has beyond its mask."""
        return self.output_length - self.mask_length

    def describe(self) -> str:
        """Return the one-paragraph message of the :class:`DriftWarning` for this finding."""
        where = f"{self.model}.{self.site}" if self.site else self.model
        who = (
            "no active adapter adds positions"
            if self.adapter is None
            else f"the active adapter {self.adapter!r} ({self.peft_type}) adds {self.num_virtual_tokens}"
        )
        cause = "explained" if self.explained else "NOT explained"
        effects = "; ".join(f"{p}: {what}" for p, what in self.policies.items())
        return (
            f"maskpatch audit: {where} ({self.module_type}) output {self.output!r} has {self.output_length} positions "
            f"but its mask has {self.mask_length}; {who} ({cause}). Nothing was changed. Under maskpatch, {effects}"
        )


def policy_effects(output: str, output_length: int, mask_length: int, m: int) -> dict[str, str]:
    """Return, for each policy, what maskpatch would do to an ``output`` of ``output_length`` against a ``mask_length`` mask.

    ``m`` is the active adapter's ``num_virtual_tokens``. An excess other than ``m`` is refused by
    every policy (:class:`~maskpatch.errors.DriftError`).
    """
    excess = output_length - mask_length
    if excess != m:
        refused = f"raises DriftError (an excess of {excess} positions, but the active adapter adds {m})"
        return {policy: refused for policy in POLICIES}
    return {
        "extend": f"the mask gets {m} leading attend entries ({mask_length} -> {output_length}); virtual tokens count",
        "ignore": f"the mask gets {m} leading do-not-attend entries ({mask_length} -> {output_length}); virtual "
        "tokens are excluded",
        "strip": f"the first {m} positions are cut from {output!r} ({output_length} -> {mask_length})",
    }


class AuditReport:
    """What an audit found: ``findings``, one :class:`Finding` per site, in the order first seen.

    Plain data (it travels with a pickled audited model). Recording takes maskpatch's lock, and
    only the first time a site shows drift.
    """

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self._seen: set[tuple[str, ...]] = set()

    @property
    def affected(self) -> bool:
        """Whether any site showed drift."""
        return bool(self.findings)

    def seen(self, key: tuple[str, ...]) -> bool:
        """Whether the site ``key`` has been recorded (a read without the lock: the hot path)."""
        return key in self._seen

    def record(self, key: tuple[str, ...], finding: Finding) -> bool:
        """Add ``finding`` for site ``key`` unless that site is recorded already; return whether it was added."""
        with LOCK:
            if key in self._seen:
                return False
            self._seen.add(key)
            self.findings.append(finding)
        return True

    def summary(self) -> str:
        """Return one line per finding (or a line saying there is none)."""
        if not self.findings:
            return "maskpatch audit: no token-level output disagreed with its mask"
        return "\n".join(f.describe() for f in self.findings)

    def __repr__(self) -> str:
        return f"<AuditReport {len(self.findings)} finding(s)>"


class AuditHook:
    """Base class of the audit observers: a forward hook that compares shapes and returns None.

    Not a :class:`~maskpatch.hooks.MaskpatchHook` on purpose: an audited model is not patched.
    Subclasses implement ``__call__(module, args, kwargs, output)`` and call :meth:`observe`.
    """

    always_call: ClassVar[bool] = False

    def __init__(self, report: AuditReport, model: str, site: str, module_type: str) -> None:
        self.report = report
        self.model = model
        self.site = site
        self.module_type = module_type

    def observe(
        self, output: str, output_length: int, mask_length: int, owner: Any, *, layout: VirtualLayout | None = None
    ) -> None:
        """Record the drift of ``output`` at this site, once.

        ``owner`` holds the PEFT adapter (if any) whose layout explains the drift; a family that
        prepends without PEFT passes its ``layout`` instead.
        """
        key = (self.model, self.site, self.module_type, output)
        if self.report.seen(key):
            return
        layout = active_layout(owner) if layout is None else layout
        m = layout.num_virtual_tokens
        finding = Finding(
            model=self.model,
            site=self.site,
            module_type=self.module_type,
            output=output,
            output_length=output_length,
            mask_length=mask_length,
            adapter=layout.adapter if layout.adds_positions else None,
            peft_type=layout.peft_type if layout.adds_positions else None,
            num_virtual_tokens=m,
            explained=output_length - mask_length == m,
            policies=policy_effects(output, output_length, mask_length, m),
        )
        if self.report.record(key, finding):
            warnings.warn(finding.describe(), DriftWarning, stacklevel=2)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(site={self.site!r})"


class TransformerOutputObserver(AuditHook):
    """Observer at :class:`~maskpatch.adapters.sentence_transformers.transformer.TransformerOutputHook`'s site."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not isinstance(output, Mapping) or "cu_seq_lens_q" in output:
            return
        key = getattr(module, "module_output_name", "token_embeddings")
        tokens, mask = output.get(key), output.get("attention_mask")
        if not (isinstance(tokens, Tensor) and isinstance(mask, Tensor)) or tokens.dim() != 3 or mask.dim() != 2:
            return
        if tokens.shape[1] > mask.shape[1]:
            self.observe(key, tokens.shape[1], mask.shape[1], getattr(module, "model", None))


class PeftOutputObserver(AuditHook):
    """Observer at :class:`~maskpatch.adapters.peft.PeftOutputHook`'s site: every token-level field of the output."""

    def __init__(self, report: AuditReport, model: str, site: str, module_type: str, kind: str) -> None:
        super().__init__(report, model, site, module_type)
        self.kind = kind

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not isinstance(output, Mapping):
            return
        n = input_length(as_kwargs(module, args, kwargs) if args else kwargs)
        if n == 0:
            return
        row = task_named(self.kind)  # audit observes; apply refuses an unknown task class
        for name, dims in ENCODER_FIELDS if row is None else row.fields:
            value = output.get(name)
            tensor = value if isinstance(value, Tensor) or not value else value[-1]
            if isinstance(tensor, Tensor) and tensor.dim() > dims[-1] and tensor.shape[dims[-1]] > n:
                self.observe(name, tensor.shape[dims[-1]], n, module)


class XtOutputObserver(AuditHook):
    """Observer at :class:`~maskpatch.adapters.x_transformers.XtOutputHook`'s site: the logits or embeddings.

    The caller's mask has the ``N`` columns of the token ids ``x``; ``prepend_embeds`` make the
    main output ``P + N`` long (x-transformers pads its own copy of the mask).
    """

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        x, prepend = args[0] if args else kwargs.get("x"), kwargs.get("prepend_embeds")
        main = output[0] if isinstance(output, tuple) and output else output
        main = main[0] if isinstance(main, tuple) and main else main
        if kwargs.get("excise_prepend_embeds") or kwargs.get("cache") is not None or not isinstance(prepend, Tensor):
            return
        if not (isinstance(x, Tensor) and isinstance(main, Tensor) and main.dim() >= 2 and x.dim() >= 2):
            return
        if main.shape[1] > x.shape[1]:
            layout = VirtualLayout("prepend_embeds", "x-transformers", int(prepend.shape[1]))
            self.observe("logits/embeddings", main.shape[1], x.shape[1], None, layout=layout)


#: The type of a factory that builds the observer for one repair hook site.
ObserverFactory = Callable[[AuditReport, str, str, nn.Module], AuditHook]


def _observer_class(cls: type[AuditHook]) -> ObserverFactory:
    def build(report: AuditReport, model: str, site: str, module: nn.Module) -> AuditHook:
        return cls(report, model, site, type(module).__name__)

    return build


def _peft_observer(report: AuditReport, model: str, site: str, module: nn.Module) -> AuditHook:
    found = find_task(module)
    return PeftOutputObserver(report, model, site, type(module).__name__, "" if found is None else found[0].__name__)


#: repair hook class -> the observer audit mode puts at the same site instead. Plain data.
_OBSERVERS: dict[type, ObserverFactory] = {
    TransformerOutputHook: _observer_class(TransformerOutputObserver),
    PeftOutputHook: _peft_observer,
    XtOutputHook: _observer_class(XtOutputObserver),
}


def register_observer(hook_type: type, factory: type[AuditHook] | ObserverFactory) -> None:
    """Let audit mode observe the sites of ``hook_type`` (an adapter's output hook) with ``factory``.

    ``factory`` is an :class:`AuditHook` subclass (built with ``(report, model, site, module_type)``)
    or a callable ``(report, model, site, module) -> AuditHook``.
    """
    is_class = isinstance(factory, type) and issubclass(factory, AuditHook)
    _OBSERVERS[hook_type] = _observer_class(factory) if is_class else factory  # type: ignore[arg-type]


class AuditSession:
    """The observers of one audit; a context manager whose ``with`` target is the :class:`AuditReport`.

    :meth:`remove` (idempotent, also run on leaving the block) removes every observer exactly.
    """

    def __init__(self, report: AuditReport, handles: list[RemovableHandle]) -> None:
        self.report = report
        self._handles = handles

    @property
    def sites(self) -> int:
        """How many observers this audit registered."""
        return len(self._handles)

    def remove(self) -> None:
        """Remove every observer of this audit; a second call does nothing."""
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> AuditReport:
        return self.report

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


def audit(model: nn.Module, *, report: AuditReport | None = None) -> AuditSession:
    """Observe ``model``'s drift without changing any output; use as ``with audit(model) as report:``.

    ``model`` is anything :func:`maskpatch.apply` handles through a registered adapter (a
    SentenceTransformer or one of its modules, a PeftModel). Observers go where that adapter's
    repair would act; findings are added to ``report`` (a new :class:`AuditReport` by default).
    Returns the :class:`AuditSession`, already observing. Raises
    :class:`~maskpatch.errors.UnsupportedModelError` when no adapter handles ``model`` or its
    adapter has no site audit mode can observe, before registering anything.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module to audit, but got {type(model).__qualname__}")
    report = AuditReport() if report is None else report
    specs = _observer_specs(model, report)
    handles: list[RemovableHandle] = []
    try:
        for module, hook in specs:
            handles.append(module.register_forward_hook(hook, with_kwargs=True))  # type: ignore[arg-type]
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return AuditSession(report, handles)


def _observer_specs(model: nn.Module, report: AuditReport) -> list[tuple[nn.Module, AuditHook]]:
    """Plan the observers for ``model``: one per output hook its adapter would register."""
    adapter = find_adapter(model)
    probe = InstallRecord("extend", adapter.name, pinned=False)
    names = {id(module): name for name, module in model.named_modules()}
    label = type(model).__name__
    specs: list[tuple[nn.Module, AuditHook]] = []
    for spec in adapter.plan(model, probe):
        factory = _OBSERVERS.get(type(spec.hook))
        if factory is not None:
            site = names.get(id(spec.module), type(spec.module).__name__)
            specs.append((spec.module, factory(report, label, site, spec.module)))
    if not specs:
        raise UnsupportedModelError(
            f"the {adapter.name!r} adapter handles {label}, but audit mode has no observer for any of its hook sites; "
            "register one with maskpatch.auditing.register_observer"
        )
    return specs


def is_audited(model: nn.Module, report: AuditReport) -> bool:
    """Return whether ``model`` already carries an observer that records into ``report``."""
    hooks: list[object] = [hook for module in model.modules() for hook in module._forward_hooks.values()]
    return any(isinstance(hook, AuditHook) and hook.report is report for hook in hooks)

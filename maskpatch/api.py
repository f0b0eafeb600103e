"""The public entry points: ``apply``, ``patched``, ``is_patched`` and ``remove``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from . import provenance
from .adapters.generic import NAME as PREPENDED_TOKENS
from .adapters.generic import PrependedTokensAdapter, check_same_count, validate_count
from .adapters.hosts import apply_host, host_adapter, is_host_patched, patched_host, remove_host
from .compat.versions import check_environment
from .conventions import MaskConvention
from .drift import Policy, validate_policy
from .errors import AlreadyPatchedError, MaskpatchWarning, UnsupportedModelError
from .handle import LOCK as _LOCK
from .handle import PatchHandle, covers, find_record, install, install_state, iter_hooks, remove_hooks
from .hooks import InstallRecord
from .inputs import require_module
from .registry import Adapter, check_requirements, find_adapter, get_adapter, installed_adapter

__all__ = ["apply", "is_patched", "output_mask", "patched", "remove"]


def apply(
    model: nn.Module,
    *,
    policy: Policy = "extend",
    check_versions: bool = True,
    prepended_tokens: int | None = None,
    strict: bool = False,
) -> PatchHandle:
    """Patch ``model`` so its token-level outputs and masks line up again; return the handle.

    ``model`` is what the user holds: a SentenceTransformer (or another sentence-transformers
    model class), one of its modules, or a model another registered adapter handles. ``policy``
    is ``"extend"`` (the default), ``"ignore"`` or ``"strip"``. A second ``apply`` on a patched
    model installs nothing: it warns and returns the existing install's handle, and raises
    :class:`AlreadyPatchedError` if it asks for another policy, or if the existing install was
    made on a part of ``model`` and lacks hooks that patching ``model`` needs (``apply(model[0])``
    then ``apply(model)`` under ``extend``). Joining a part of the model an install was made on
    (``apply(model)`` then ``apply(model[0])``) is decided from the install's record when the
    install covered that part whole and its adapter plans parts as the whole (sentence-transformers,
    x-transformers); otherwise (a container of the install's root, a model sharing a module with
    it, a copy, a part another adapter resolves, such as the PeftModel inside) from a plan
    compared with the hooks in place. ``handle.remove()`` undoes the install exactly.
    Library versions outside an adapter's tested range raise :class:`UnsupportedVersionError`
    unless ``check_versions`` is false.

    ``prepended_tokens=M`` patches a module that prepends ``M`` tokens by itself, without PEFT
    (see :mod:`maskpatch.adapters.generic` and :func:`maskpatch.prepended_mask`).

    ``model`` may also be a host that calls a PeftModel for the user: a transformers ``Pipeline``
    or ``Trainer``. Its model is patched with ``policy``, and the host itself always sees outputs
    lined up with its own tokens (see :mod:`maskpatch.adapters.hosts`).

    A module compiled with ``torch.compile`` is patched through the module it wraps
    (``compiled._orig_mod``); the handle refers to that module. One install serves one module
    tree: a module shared by two models (one ``Transformer`` in two SentenceTransformers) carries
    one install, which ``remove`` takes off whole, from every model that shares it (see the
    getting-started guide).

    A combination maskpatch cannot make right (a *known limit*, :mod:`maskpatch.limits`: a
    left-padded T5, a padded batch past a sliding window, ...) warns with a
    :class:`MaskpatchWarning` once per install; with ``strict=True`` it raises
    :class:`KnownLimitError` instead, every time it occurs. A second ``apply`` that returns an
    existing install keeps that install's ``strict``.
    """
    host = host_adapter(model)
    if host is not None:
        return apply_host(host, model, policy=policy, check_versions=check_versions, prepended_tokens=prepended_tokens)
    policy = _validate(model, policy, prepended_tokens)
    model = unwrap_compiled(model)
    with _LOCK:
        record = _joinable_record(model, policy, prepended_tokens)
        if record is None:
            return _install(
                model, policy, pinned=True, check_versions=check_versions, prepended=prepended_tokens, strict=strict
            )
        warnings.warn(
            f"{type(model).__name__} is already patched by maskpatch (policy {record.policy!r}); "
            "returning the existing handle instead of patching twice",
            MaskpatchWarning,
            stacklevel=2,
        )
        record.pinned = True
        return PatchHandle(model, record)


@contextmanager
def patched(
    model: nn.Module,
    *,
    policy: Policy = "extend",
    check_versions: bool = True,
    prepended_tokens: int | None = None,
    strict: bool = False,
) -> Iterator[PatchHandle]:
    """Patch ``model`` for the body of a ``with`` block; undo on exit, also when the body raises.

    Blocks nest, on one thread or several: a block entered on a model that is already patched
    with the same policy joins that install, and the install is removed when the last block that
    shares it exits (never when it was made by an explicit :func:`apply`). ``prepended_tokens`` and
    ``strict`` are as for :func:`apply` (a block that joins an install keeps that install's ``strict``);
    ``model`` may be a host, as for :func:`apply`.
    """
    host = host_adapter(model)
    if host is not None:
        with patched_host(
            host, model, policy=policy, check_versions=check_versions, prepended_tokens=prepended_tokens
        ) as handle:
            yield handle
        return
    from .nesting import counted_block  # the nesting rule, shared with the host adapters

    policy = _validate(model, policy, prepended_tokens)
    target = unwrap_compiled(model)

    def open_install() -> PatchHandle:
        record = _joinable_record(target, policy, prepended_tokens)
        if record is not None:
            return PatchHandle(target, record)
        return _install(
            target, policy, pinned=False, check_versions=check_versions, prepended=prepended_tokens, strict=strict
        )

    with counted_block(open_install) as handle:
        yield handle


def is_patched(model: nn.Module) -> bool:
    """Return whether any module of ``model`` carries a maskpatch hook (a host: whether it is patched as one)."""
    host = host_adapter(model)
    if host is not None:
        return is_host_patched(host, model)
    return isinstance(model, nn.Module) and find_record(model) is not None


def remove(model: nn.Module) -> bool:
    """Remove every install found in ``model``, whole; return whether there was any.

    This is the way to unpatch a copy (``pickle``, ``copy.deepcopy``, ``torch.save``) of a patched
    model, whose handle stayed with the original. An install is removed whole, never in part: when
    ``model`` shares a module with another model patched by the same install, that model is
    unpatched too (no model is left half repaired). For a host (a pipeline, a Trainer) it removes
    every maskpatch hook from the host's model.

    On the model :func:`apply` was called on, the install is removed through its record (torch's
    removable handles of its hooks): O(hooks), no walk of the model's modules. That is exact
    because one module tree holds one install: a second ``apply`` on a part, a container or a
    model sharing a module joins the install it finds or raises, and where two installs' trees do
    meet (a host install on a PeftModel patched on its own, an install on a PeftModel added to a
    patched model later, a hook registered lazily on a module another patched model holds) both
    are remembered as sharing, and ``remove`` scans ``model`` as long as the other is live. A part
    or a container of an install's root, a copy and an unpatched model are scanned. The one thing
    no record sees is a module that already carries another install's hooks put into ``model``
    after ``apply(model)``: ``remove(model)`` then removes ``model``'s own install (as its
    ``handle.remove()`` does) and leaves the other whole; remove an install before moving its
    modules into another patched model.
    """
    host = host_adapter(model)
    if host is not None:
        return remove_host(host, model)
    _require_module(model)
    with _LOCK:
        return remove_hooks(model) > 0


def _validate(model: object, policy: object, prepended: int | None) -> Policy:
    policy = validate_policy(policy)
    _require_module(model)
    if prepended is not None:
        validate_count(prepended)
    return policy


def _joinable_record(model: nn.Module, policy: Policy, prepended: int | None) -> InstallRecord | None:
    """Return the install ``model`` already has (None if none); raise if it cannot be joined.

    An install found on ``model`` can be joined when it has the same options and already holds
    every hook that patching ``model`` itself would register. An install made on a part of
    ``model`` (``apply(model[0])`` or ``apply(peft_model)`` before ``apply(model)``) may lack
    some, and joining it would leave ``model`` half repaired: that raises instead.

    Decided without a plan where the record answers: ``model`` is the install's root, no adapter
    handles ``model`` (a module inside a patched model), or ``model`` is a part the install
    covered (:func:`_covers_part`). A container of the root, a model sharing a module with it, a
    copy (its root is unknown) and a part another adapter resolves still compare a plan: what an
    adapter would hook outside the root's tree, or on a model it did not plan, only its plan says.
    """
    record = find_record(model)
    if record is None:
        return None
    _require_same_policy(model, record, policy)
    check_same_count(model, prepended)
    if record.root is model:
        return record  # the install made on this very model holds every hook patching it needs
    try:
        adapter = _adapter_for(model, prepended)
    except UnsupportedModelError:
        return record  # a module no adapter handles, inside a patched model: it is covered by that install
    if _covers_part(record, model, adapter):
        return record
    missing = _missing_hooks(model, record, adapter)
    if missing:
        name = type(model).__name__
        raise AlreadyPatchedError(
            f"{name} is already patched in part: {describe_holder(model, record)} holds a {record.adapter!r} "
            f"install (policy {record.policy!r}) that lacks the hooks patching {name} needs "
            f"({', '.join(missing)}); one install serves one module tree, so remove that install first (its "
            f"handle.remove(), or maskpatch.remove({name}), which removes it whole, from every model that shares it), "
            f"then patch {name}"
        )
    return record


def describe_holder(model: nn.Module, record: InstallRecord) -> str:
    """Say where the install ``record`` found in ``model`` was made, relative to ``model``."""
    root, name = record.root, type(model).__name__
    if root is None:
        return f"a copied install found in {name} (made before pickling or deepcopy)"
    if root is model:
        return name
    if any(module is root for module in model.modules()):
        return f"a part of {name} ({type(root).__name__}, patched on its own)"
    if any(module is model for module in root.modules()):
        return f"a model that contains {name} ({type(root).__name__})"
    shared = next((type(m).__name__ for m in model.modules() if any(m is r for r in root.modules())), "a module")
    return f"another model that shares its {shared} ({type(root).__name__})"


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """Return the module a ``torch.compile`` wrapper (``OptimizedModule``) compiles, else ``model``.

    Hooks registered on the wrapped module are honoured by the compiled one (dynamo recompiles).
    """
    while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod  # type: ignore[assignment]
    return model


# The adapters whose plan for a part of a model is their plan for the whole model restricted to
# that part's modules (hooks by module class, per module), so that a part the install covered
# needs no hook it does not hold (:func:`_covers_part`). Not the generic adapter (its output hook
# sits on the module ``apply`` was called on), nor adapters this list does not name.


def _covers_part(record: InstallRecord, model: nn.Module, adapter: Adapter) -> bool:
    """Decide, without a plan, that the complete install ``record`` holds every hook patching ``model`` needs.

    True when ``model`` is a part of the install's root that the install covered whole (every
    module of ``model`` was in the root's tree at install), the install is complete, and the
    adapter that resolves ``model`` is the one that made it and plans parts as the whole (it
    declares ``plans_parts_exactly = True``, an optional capability). Hooks such an install registers lazily (a PEFT model's
    position ids) it registers on the part's forward too. Otherwise (a container of the root, a
    model sharing a module with it, a copy, another adapter) the caller compares a plan.
    """
    if record.owner is not adapter or getattr(adapter, "plans_parts_exactly", False) is not True:
        return False
    return install_state(record, model) == "active" and covers(record, model)


def _missing_hooks(model: nn.Module, record: InstallRecord, adapter: Adapter) -> list[str]:
    """Name the hooks ``adapter`` would register to patch ``model`` that ``record``'s install lacks (plans)."""
    have = {(id(module), type(hook)) for module, _, hook in iter_hooks(model) if hook.record is record}
    probe = InstallRecord(record.policy, adapter.name, pinned=False)
    return [
        f"{type(spec.hook).__name__} on {type(spec.module).__name__}"
        for spec in adapter.plan(model, probe)
        if (id(spec.module), type(spec.hook)) not in have
    ]


def _adapter_for(model: nn.Module, prepended: int | None) -> Adapter:
    """Resolve the adapter: the registered one that matches ``model``, or the generic one for ``prepended_tokens``.

    A module that prepends tokens by itself cannot be recognised: the stated count selects the
    registered ``"prepended-tokens"`` adapter, configured with that count.
    """
    if prepended is None:
        return find_adapter(model)
    generic = get_adapter(PREPENDED_TOKENS)
    if not isinstance(generic, PrependedTokensAdapter):
        raise UnsupportedModelError(
            f"prepended_tokens= selects the {PREPENDED_TOKENS!r} adapter, but the one registered under that name "
            f"({generic!r}) is not a maskpatch.adapters.generic.PrependedTokensAdapter"
        )
    return generic.with_count(prepended)


def _install(
    model: nn.Module,
    policy: Policy,
    *,
    pinned: bool,
    check_versions: bool,
    prepended: int | None = None,
    strict: bool = False,
) -> PatchHandle:
    if check_versions:  # before anything version-specific of the upstream libraries is imported
        check_environment()
    adapter = _adapter_for(model, prepended)  # resolve
    if check_versions:
        check_requirements(adapter)  # check
    record = InstallRecord(policy, adapter.name, pinned=pinned, root=model, strict=strict)
    record.owner = adapter
    install(adapter.plan(model, record))  # plan, install (recording every hook's site)
    # A prompt saved from this model records the policy it was trained with (maskpatch.provenance).
    provenance.track(model, record)
    return PatchHandle(model, record)


def output_mask(
    model: nn.Module, attention_mask: Tensor, *, convention: MaskConvention = MaskConvention.ONES
) -> Tensor:
    """Return the mask (in ``convention``, ``ONES`` by default: 1 attends) that lines up with ``model``'s outputs now.

    ``model`` is a model patched by :func:`maskpatch.apply`: a PeftModel, a model holding one (a
    SentenceTransformer), or a module patched with ``prepended_tokens=M``; and
    ``attention_mask`` the caller's ``(B, N)`` mask. While the active adapter prepends ``M``
    virtual tokens, under ``extend`` the result has ``M`` leading attending entries and under
    ``ignore`` ``M`` non-attending ones (``(B, M + N)``, like the outputs); under ``strip``, and
    when nothing is prepended (prefix tuning, LoRA, a disabled adapter), it is ``attention_mask``
    itself. Dtype and device are ``attention_mask``'s; it is not modified::

        mask  1 1 0     extend, M=2: 1 1 | 1 1 0     ignore: 0 0 | 1 1 0     strip: 1 1 0

    The install is found through its record (O(hooks) on the model ``apply`` was called on) and
    the adapter that made it answers (its ``output_mask``, :class:`maskpatch.registry.MaskAdapter`).
    Raises :class:`UnsupportedModelError` when ``model`` is not patched, or its adapter has no
    ``output_mask``.
    """
    require_module(model, where="output_mask")
    record = find_record(model)
    if record is None:
        raise UnsupportedModelError(
            f"expected a model patched with maskpatch.apply(...), but {type(model).__name__} is not patched"
        )
    method = getattr(installed_adapter(record), "output_mask", None)  # the MaskAdapter capability
    if not callable(method):
        raise UnsupportedModelError(
            f"{type(model).__name__} is patched by the {record.adapter!r} adapter, which provides no output_mask"
        )
    mask: Tensor = method(model, record, attention_mask, convention=convention)
    return mask


def _require_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"expected a torch.nn.Module (a SentenceTransformer, one of its modules or a PeftModel), "
            f"but got {type(model).__module__}.{type(model).__qualname__}"
        )


def _require_same_policy(model: nn.Module, record: InstallRecord, policy: Policy) -> None:
    if record.policy != policy:
        name = type(model).__name__
        raise AlreadyPatchedError(
            f"{name} is already patched with policy {record.policy!r} (an install made on "
            f"{describe_holder(model, record)}), but policy {policy!r} was asked for; remove the first install "
            f"(handle.remove() or maskpatch.remove({name})) before patching with another policy"
        )

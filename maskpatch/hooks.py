"""The hook objects maskpatch registers, and the record they share.

Every hook is an instance of a module-level class holding plain data, so a patched model
survives ``pickle``, ``copy.deepcopy`` and ``torch.save`` (multi-process pools pickle the model).
The hooks of one install share one :class:`InstallRecord`, which keeps torch's removable handles
of them: on the model ``apply`` was called on, ``is_patched`` and ``remove`` go through it
(:mod:`maskpatch.handle`); a copy of a patched model carries its hooks and records along, is
still patched, and is found by scanning it.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .compat.generation import CACHE, LEGACY_CACHE, cache_name_in
from .drift import Policy, positions_from_mask
from .layout import active_layout, is_peft_model
from .positions import position_scheme

__all__ = [
    "LOCK",
    "ForwardHook",
    "ForwardPreHook",
    "InstallRecord",
    "MaskpatchHook",
    "PositionIdsHook",
    "PreHookResult",
    "accepts_position_ids",
    "ensure_position_hook",
    "has_position_hook",
    "position_hook_for",
    "position_hook_key",
    "submodule",
]


#: One process-wide lock orders installs, removals and hooks registered during a forward. It
#: lives here, never on a model, so patched models stay picklable.
LOCK = threading.RLock()


class InstallRecord:
    """What one ``apply`` installed: its policy, and who keeps it alive.

    ``pinned`` is true while an explicit :func:`maskpatch.apply` owns the install; ``contexts``
    counts the :func:`maskpatch.patched` blocks inside it. The install is removed when the last
    context exits, unless it is pinned. ``root`` is the module ``apply`` was called on, so that a
    handle obtained through a part of it still removes the whole install. ``strict`` turns a known
    limit into an error instead of a warning; ``reported`` names the limits already warned about,
    so each warns once per install (:mod:`maskpatch.limits`).
    """

    def __init__(
        self, policy: Policy, adapter: str, *, pinned: bool, root: nn.Module | None = None, strict: bool = False
    ) -> None:
        self.policy: Policy = policy
        self.adapter = adapter
        self.pinned = pinned
        self.contexts = 0
        self.root = root
        self.strict = strict
        self.reported: set[str] = set()  # the known limits this install has warned about (maskpatch.limits)
        #: torch's removable handles of every hook this install registered, wherever it sits now
        #: (a PeftModel swapped out of ``root`` still carries its hook): removal goes through them.
        self.sites: list[RemovableHandle] = []
        #: What else to undo with the install (class-level wrappers it holds), run once at removal.
        self.releases: list[Callable[[InstallRecord], None]] = []
        #: Set, under :data:`LOCK`, when the install is removed: nothing of it may be registered after.
        self.removed = False
        #: The adapter object that planned the install (its capabilities, e.g. ``output_mask``, are
        #: asked through the record); None on a copy, where the registry is asked by ``adapter`` name.
        self.owner: Any = None
        #: Set once the install is known by its root (:func:`maskpatch.handle.install`): a hook
        #: registered after that (during a forward) is noted there, for where it lands.
        self.tracked = False

    def register(self, module: nn.Module, hook: MaskpatchHook) -> bool:
        """Register ``hook`` on ``module`` for this install unless it was removed; return whether it was.

        Hooks registered during a forward (an adapter set after ``apply``) go through here, under
        :data:`LOCK`, so that a ``remove()`` on another thread never leaves one behind.
        """
        with LOCK:
            if self.removed:
                return False
            if hook.pre:
                site = module.register_forward_pre_hook(hook, with_kwargs=True)
            else:
                site = module.register_forward_hook(hook, with_kwargs=True, always_call=hook.always_call)
            self.sites.append(site)
            hook.attached()
            if self.tracked:  # registered lazily: it may land in a module another install's tree holds
                from .handle import note_late_site  # imported here: handle imports this module

                note_late_site(self, module)
            return True

    def hooks(self) -> list[MaskpatchHook]:
        """Return the hooks of this install still in place, through its sites (O(hooks); empty on a copy)."""
        found = []
        for site in self.sites:
            hooks = site.hooks_dict_ref()
            hook = None if hooks is None else hooks.get(site.id)
            if isinstance(hook, MaskpatchHook):
                found.append(hook)
        return found

    def release(self) -> None:
        """Mark the install removed and undo what its hooks took besides themselves (once; under :data:`LOCK`)."""
        with LOCK:
            self.removed = True
            self.sites.clear()
            releases, self.releases = self.releases, []
            for undo in reversed(releases):
                undo(self)

    def __getstate__(self) -> dict[str, Any]:
        # A copy lives on in another process or object, where no ``patched()`` block of ours is
        # open: it stays patched until ``maskpatch.remove`` is called on it. The root is not
        # carried along, so that pickling a part of a patched model does not drag in the whole;
        # neither are the sites and releases of the original's hooks (a copy is found by scanning).
        state = {**self.__dict__, "pinned": True, "contexts": 0, "root": None, "sites": [], "releases": []}
        return {**state, "owner": None, "tracked": False}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Records pickled by an older maskpatch lack the newer fields.
        defaults = {"sites": [], "releases": [], "removed": False, "root": None, "owner": None, "tracked": False}
        self.__dict__.update({**defaults, **state})

    def __repr__(self) -> str:
        return f"InstallRecord(policy={self.policy!r}, adapter={self.adapter!r})"


class MaskpatchHook:
    """Base class of every hook maskpatch registers; ``pre`` says which kind of forward hook it is.

    Hooks derive from one of its two typed subclasses, :class:`ForwardPreHook` (``pre`` true) or
    :class:`ForwardHook`, which also name the signature torch calls them with. ``always_call``
    (forward hooks only) asks torch to run the hook also when the forward raises.
    """

    pre: ClassVar[bool] = False
    always_call: ClassVar[bool] = False

    def __init__(self, record: InstallRecord) -> None:
        self.record = record

    def attached(self) -> None:
        """Called (under :data:`LOCK`) once this hook is registered; take what it needs besides the hook.

        A hook that needs a class-level wrapper appends its undo to ``self.record.releases``.
        Nothing by default.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.record!r})"

    if TYPE_CHECKING:
        # torch calls every hook; each subclass (ForwardPreHook, ForwardHook) declares its own signature.
        def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


#: What a forward pre-hook returns to replace the call's arguments (None keeps them).
PreHookResult = tuple[tuple[Any, ...], dict[str, Any]] | None


class ForwardPreHook(MaskpatchHook):
    """Base class of a forward pre-hook: runs before ``module.forward``, may replace its arguments.

    maskpatch registers it with ``register_forward_pre_hook(hook, with_kwargs=True)``. Subclasses
    implement :meth:`__call__`; they read the policy from ``self.record.policy`` at call time and
    return new ``(args, kwargs)`` (never changing the caller's tensors or dicts in place), or None
    to leave the call as it is.
    """

    pre: ClassVar[bool] = True

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> PreHookResult:
        """Return replacement ``(args, kwargs)`` for ``module``'s forward, or None to keep them."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement __call__(module, args, kwargs)")


class ForwardHook(MaskpatchHook):
    """Base class of a forward hook: runs after ``module.forward``, may replace its output.

    maskpatch registers it with ``register_forward_hook(hook, with_kwargs=True,
    always_call=cls.always_call)``. Subclasses implement :meth:`__call__`; they read the policy from
    ``self.record.policy`` at call time and return a new output (never the caller's dict changed in
    place), or None to leave the output as it is.
    """

    pre: ClassVar[bool] = False

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Return a replacement for ``output``, or None to keep it."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement __call__(module, args, kwargs, output)")


class PositionIdsHook(ForwardPreHook):
    """Forward pre-hook on a PEFT model's base model: position ids that skip padding.

    PEFT drops ``position_ids`` for prompt tuning and P-tuning, so the base model numbers the
    ``M + N`` positions ``0..M+N-1`` and a left-padded text gets other positions (and, with
    RoPE, other results) than the same text alone. This hook passes position ids computed from
    the extended mask instead, in the model's own numbering (:mod:`maskpatch.positions`): virtual
    tokens ``first..first+M-1``, real tokens from ``first+M``, pads skipped, where ``first`` is the
    position the model gives the first of an unpadded input (0 for most, ``padding_idx + 1`` for
    RoBERTa-style embeddings), read once at install. It only acts when the active adapter
    prepends positions and the caller gave no position ids.
    In a cached decoding step of ``generate`` (``q`` new tokens, a mask over the whole sequence
    and a cache, as ``past_key_values`` or, since transformers 5.24, ``cache``) it passes the
    last ``q`` of those position ids.
    """

    def __init__(self, record: InstallRecord, peft_model: nn.Module, *, first: int = 0) -> None:
        super().__init__(record)
        self.peft_model = peft_model
        self.first = first

    def attached(self) -> None:
        # PEFT's disable_adapter() crashes on patched encoders without the class-level wrapper.
        from .adapters.peft import hold_disable_adapter_wrapper

        hold_disable_adapter_wrapper(self.record)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # The hot path: runs on every forward, so it reads each value once and builds nothing
        # it does not return (see docs/performance.md).
        get = kwargs.get
        if get("position_ids") is not None:
            return None
        mask, embeds = get("attention_mask"), get("inputs_embeds")
        # Under either name: ``cache`` since transformers 5.24. cache_name_in (which refuses two
        # different caches) only runs when there is one: most forwards carry none.
        cached = (get(CACHE) is not None or get(LEGACY_CACHE) is not None) and cache_name_in(kwargs) is not None
        if embeds is None and cached:
            embeds = get("input_ids")  # a decoding step of generate: new token ids after a cache
        if not isinstance(mask, torch.Tensor) or not isinstance(embeds, torch.Tensor) or mask.dim() != 2:
            return None
        new, length = embeds.shape[1], mask.shape[1]
        if length != new and not (length > new and cached):
            return None
        if not active_layout(self.peft_model).adds_positions:
            return None
        positions = positions_from_mask(mask, self.first)
        if new != length:  # only a decoding step slices: a no-op slice still costs a dispatch
            positions = positions[:, length - new :]
        return args, {**kwargs, "position_ids": positions}


def accepts_position_ids(module: nn.Module) -> bool:
    """Return whether ``module.forward`` names a ``position_ids`` parameter (T5, for one, does not)."""
    forward = module.forward
    func = getattr(forward, "__func__", None)
    if func is not None and getattr(forward, "__self__", None) is module:
        # A method of the class: its signature is the same for every instance, and reading it
        # on every forward (models without position ids ask each time) costs ~10 microseconds.
        return _names_position_ids(func)
    return _names_position_ids.__wrapped__(forward)


@functools.lru_cache(maxsize=128)
def _names_position_ids(func: Callable[..., Any]) -> bool:
    try:
        return "position_ids" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def has_position_hook(module: nn.Module) -> bool:
    """Return whether ``module`` already carries a :class:`PositionIdsHook` (of any install)."""
    return position_hook_key(module) is not None


def position_hook_key(module: nn.Module) -> int | None:
    """Return the key of the :class:`PositionIdsHook` in ``module``'s pre-hooks (of any install), or None.

    torch never reuses a hook key, so ``key in module._forward_pre_hooks`` later tells, in one
    dictionary lookup, whether that same hook is still registered.
    """
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, PositionIdsHook):
            return key
    return None


def submodule(module: nn.Module, name: str) -> Any:
    """Return ``getattr(module, name, None)``, reading a registered submodule straight from ``_modules``.

    The same object (``nn.Module`` keeps a submodule only in ``_modules``), without the detour through
    ``__getattr__`` that costs a microsecond or more on a sentence-transformers module (it first
    looks up deprecated method names) and on a PeftModel.
    """
    found = module._modules.get(name)
    return found if found is not None else getattr(module, name, None)


def position_hook_for(peft_model: Any, record: InstallRecord) -> PositionIdsHook | None:
    """Return the :class:`PositionIdsHook` ``peft_model.base_model`` still needs, or None.

    None when ``peft_model`` is not a PeftModel, when its base model already carries one (of any
    install), or when its forward takes no ``position_ids`` (T5, for one). Changes nothing.
    """
    if not is_peft_model(peft_model):
        return None
    base = peft_model.base_model
    if has_position_hook(base) or not accepts_position_ids(base):
        return None
    return PositionIdsHook(record, peft_model, first=position_scheme(base).first)


def ensure_position_hook(peft_model: Any, record: InstallRecord) -> bool:
    """Register the :class:`PositionIdsHook` that :func:`position_hook_for` says is missing.

    Returns whether one was registered: never after ``record``'s install was removed.
    """
    hook = position_hook_for(peft_model, record)
    return hook is not None and record.register(peft_model.base_model, hook)

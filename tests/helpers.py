"""Test helpers: build prompt-tuned sentence-transformers models and hand-computed references."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor


def st_model(path: str, *, pooling: str = "mean", include_prompt: bool = True, padding_side: str | None = None):
    """A SentenceTransformer of ``path`` with a fresh Transformer + Pooling(``pooling``) stack."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = Transformer(path)
    if padding_side is not None:
        transformer.tokenizer.padding_side = padding_side
    dim = transformer.get_embedding_dimension()
    pool = Pooling(dim, pooling_mode=pooling, include_prompt=include_prompt)
    return SentenceTransformer(modules=[transformer, pool], device="cpu")


def with_head(transformer, mode: str = "mean", *, include_prompt: bool = True, extra: tuple = ()):
    """A SentenceTransformer of ``transformer`` (shared, not copied) + a fresh Pooling(``mode``) + ``extra``.

    Cheap (no weights are loaded), so one prompt-tuned Transformer serves many pooling heads.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    pool = Pooling(transformer.get_embedding_dimension(), pooling_mode=mode, include_prompt=include_prompt)
    return SentenceTransformer(modules=[transformer, pool, *extra], device="cpu")


def add_prompt_learning(model, *, kind: str = "prompt", m: int = 8, seed: int = 0, adapter_name: str = "default"):
    """Put a PEFT prompt-learning (``prompt``, ``ptuning``, ``prefix``) or ``lora`` adapter on ``model[0]``."""
    from peft import (
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        TaskType,
        get_peft_model,
    )

    task = TaskType.FEATURE_EXTRACTION
    configs = {
        "prompt": lambda: PromptTuningConfig(task_type=task, num_virtual_tokens=m),
        "ptuning": lambda: PromptEncoderConfig(task_type=task, num_virtual_tokens=m, encoder_hidden_size=16),
        "prefix": lambda: PrefixTuningConfig(task_type=task, num_virtual_tokens=m),
        "lora": lambda: LoraConfig(task_type=task, r=4, target_modules="all-linear", init_lora_weights=False),
    }
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model[0].model = get_peft_model(model[0].model, configs[kind](), adapter_name=adapter_name)
    # Give the prompt non-trivial values so virtual tokens are distinguishable from real ones.
    with torch.no_grad():
        for name, param in model[0].model.named_parameters():
            if param.requires_grad and "lora" not in name:
                param.normal_(0, 1.0)
    return model


def peft_token_embeddings(
    model, features: dict[str, Any], *, position_ids: bool = False, all_layers: bool = False
) -> Tensor | tuple[Tensor, ...]:
    """Run the PEFT model by hand: prompts + word embeddings, extended mask, base model; (B, M+N, D).

    This is the reference path: it does not go through sentence-transformers or maskpatch. With
    ``position_ids``, positions follow the extended mask (virtual 0..M-1, real from M, pads skipped).
    With ``all_layers``, return every hidden state (embeddings first) instead of the last one.
    """
    pm = model[0].model
    ids, mask = features["input_ids"], features["attention_mask"]
    m = pm.active_peft_config.num_virtual_tokens
    prompts = pm.get_prompt(batch_size=ids.shape[0]).to(torch.float32)
    embeds = torch.cat([prompts, pm.word_embeddings(ids)], dim=1)
    full = torch.cat([torch.ones(ids.shape[0], m, dtype=mask.dtype), mask], dim=1)
    kwargs: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": full}
    if position_ids:
        # Virtual tokens 0..M-1, real tokens from M; a pad repeats the position of the token before it.
        kwargs["position_ids"] = (full.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = pm.base_model(**kwargs, output_hidden_states=all_layers)
    return tuple(out.hidden_states) if all_layers else out.last_hidden_state


def policy_mask(mask: Tensor, m: int, policy: str) -> Tensor:
    """The mask a policy pools with, written out by hand (1 = pool this position)."""
    ones = torch.ones(mask.shape[0], m, dtype=mask.dtype)
    if policy == "extend":
        return torch.cat([ones, mask], dim=1)
    if policy == "ignore":
        return torch.cat([ones * 0, mask], dim=1)
    return mask


def policy_tokens(tokens: Tensor, m: int, policy: str) -> Tensor:
    return tokens[:, m:] if policy == "strip" else tokens


def exclude_instruction(mask: Tensor, count: int) -> Tensor:
    """A copy of ``mask`` (1 = token) with each row's first ``count`` tokens after any left padding set to 0."""
    out = mask.clone()
    for b in range(mask.shape[0]):
        out[b, mask[b].nonzero().flatten()[:count]] = 0
    return out


def pool_by_hand(tokens: Tensor, mask: Tensor, mode: str, *, sequence: Tensor | None = None) -> Tensor:
    """Pool (B, L, D) ``tokens`` over the positions where ``mask`` is 1, written out per mode.

    ``weightedmean`` weighs the k-th position of the row's sequence with k: the sequence is
    ``sequence`` (default ``mask``), the positions that are not padding, so an instruction left out
    of ``mask`` by ``include_prompt=False`` still counts. Padding never shifts the weights.
    """
    sequence = mask if sequence is None else sequence
    rows = []
    for b in range(tokens.shape[0]):
        idx = mask[b].nonzero().flatten()
        t = tokens[b]
        if mode == "mean":
            rows.append(t[idx].mean(0))
        elif mode == "max":
            rows.append(t[idx].max(0).values)
        elif mode == "cls":
            rows.append(t[idx[0]])
        elif mode == "lasttoken":
            rows.append(t[idx[-1]])
        elif mode == "mean_sqrt_len_tokens":
            rows.append(t[idx].sum(0) / len(idx) ** 0.5)
        elif mode == "weightedmean":
            rank = sequence[b].long().cumsum(0)  # 1-based index of each position in the sequence
            weights = rank[idx].to(t.dtype)
            rows.append((t[idx] * weights[:, None]).sum(0) / weights.sum())
        else:
            raise ValueError(mode)
    return torch.stack(rows)


def encode(model, texts: list[str], **kwargs) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.encode(texts, convert_to_tensor=True, batch_size=len(texts), **kwargs)


#: Every dict in which torch keeps a module's forward hooks or their flags.
HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def state(model) -> list[tuple]:
    """Per module: its __dict__ keys and the keys of every forward-hook dict torch keeps."""
    return [(name, sorted(vars(m)), *(sorted(getattr(m, d)) for d in HOOK_DICTS)) for name, m in model.named_modules()]


# --- residue check: after remove(), nothing of maskpatch is left ---------------------------------


def touched_classes() -> list[type]:
    """Every class maskpatch may ever patch or wrap, among those imported now.

    ``peft.PeftModel`` and its subclasses (the ``disable_adapter`` wrapper, auto-enable's
    ``__init__`` wrappers), sentence-transformers' ``BaseModel`` (auto-enable), the modules it
    hooks (``Transformer``, ``Pooling``), the hosts' classes (``Pipeline``, ``Trainer``: the
    host wrappers) and ``torch.nn.Module`` itself.
    """
    import sys

    from torch import nn

    classes: list[type] = [nn.Module]
    peft_model = getattr(sys.modules.get("peft.peft_model"), "PeftModel", None)
    if isinstance(peft_model, type):
        todo = [peft_model]
        while todo:
            cls = todo.pop()
            if cls not in classes:
                classes.append(cls)
                todo.extend(cls.__subclasses__())
    for module, name in (
        ("sentence_transformers.base.model", "BaseModel"),
        ("sentence_transformers.base.modules.transformer", "Transformer"),
        ("sentence_transformers.sentence_transformer.modules.pooling", "Pooling"),
        ("transformers.pipelines.base", "Pipeline"),
        ("transformers.trainer", "Trainer"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            classes.append(cls)
    return classes


def class_state(cls: type) -> dict[str, int]:
    """``cls.__dict__`` by identity: name -> id of the value (a wrapt wrapper compares equal to what it wraps)."""
    return {name: id(value) for name, value in vars(cls).items()}


def residue_snapshot(*models, settle: bool = True) -> dict[str, Any]:
    """What "exactly as before" compares: modules, their ``__dict__`` and hook dicts, and the touched classes.

    Per module of each model (by name): its identity and type, every ``__dict__`` entry by
    identity, and every forward-hook dict's (key, hook identity) pairs; per class of
    :func:`touched_classes`: every ``__dict__`` entry by identity (a wrapper in place of a method
    shows up as another object).
    """
    if settle:
        _settle_class_wrappers()
    snapshot: dict[str, Any] = {}
    for index, model in enumerate(models):
        for name, module in model.named_modules():
            key = f"model{index}:{name or '<root>'}"
            snapshot[key] = {
                "module": (id(module), type(module)),
                "__dict__": {k: id(v) for k, v in vars(module).items()},
                **{d: [(k, id(h)) for k, h in getattr(module, d).items()] for d in HOOK_DICTS},
            }
    for cls in touched_classes():
        snapshot[f"class:{cls.__module__}.{cls.__qualname__}"] = {k: id(v) for k, v in vars(cls).items()}
    return snapshot


def _settle_class_wrappers() -> None:
    """Release class wrappers held only by installs of earlier tests whose models died without remove().

    Those stay until the next removal; settling first makes "before" mean "no live install but
    these". ``gc.collect()`` first: the dead installs must be gone from the holders.
    """
    import gc

    from maskpatch import provenance
    from maskpatch.adapters.hosts import release_unheld_host_wrappers
    from maskpatch.adapters.peft import release_unheld_wrappers

    gc.collect()
    release_unheld_wrappers()
    release_unheld_host_wrappers()
    provenance.untrack_unpatched()


def assert_no_residue(before: dict[str, Any], *models) -> None:
    """Fail, naming what differs, unless ``models`` and the touched classes are exactly as in ``before``.

    Classes imported since ``before`` was taken are not compared (they did not exist then).
    """
    after = residue_snapshot(*models, settle=False)  # a leak must show, not be settled away
    after = {k: v for k, v in after.items() if not k.startswith("class:") or k in before}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    details = []
    for key in changed[:5]:
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            diff = {k: (old.get(k), new.get(k)) for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
            details.append(f"{key}: {_short_diff(diff)}")
        else:
            details.append(f"{key}: {old!r} -> {new!r}")
    assert not changed, "maskpatch left residue: " + "; ".join(details)


def _short_diff(diff: dict[str, tuple[Any, Any]]) -> str:
    parts = []
    for name, (old, new) in sorted(diff.items()):
        if isinstance(old, dict) and isinstance(new, dict):
            keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            parts.append(f"{name} entries {keys}")
        else:
            parts.append(f"{name}: {old!r} -> {new!r}")
    return ", ".join(parts)

"""The findings of the hostile review (issue 10), one invariant per test; each failed before its fix.

Invariants protected here:

1. the generic path checks every output against the input length it saw: only ``N + M`` passes;
2. one install serves one module tree: ``remove`` takes a shared install off whole, so no model is
   left half patched, and ``is_patched`` / ``handle.active`` / ``repr`` / the error message say so;
3. the question-answering loss is the one computed from the real positions in the caller's frame;
4. ``handle.remove()`` reaches a PeftModel swapped out of the model since ``apply``;
5. ``maskpatch doctor`` answers a bad config with exit status 2 and one line, never a traceback;
6. non-tensor inputs are accepted where upstream accepts them, or refused naming expected and found;
7. ``apply(torch.compile(peft_model))`` patches the compiled module's original;
8. ``MASKPATCH_STRICT=1`` with a bad value fails every import of the libraries, retries too;
9. a huge ``MASKPATCH_AUTO`` is not quoted whole, a huge ``prepended_tokens`` is refused at apply;
10. exact undo: no class wrapper outlives the last install or comes from a plan, and no hook or
    route is left by a forward that ran while ``remove()`` happened.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import maskpatch
from maskpatch.adapters import peft as peft_adapter
from maskpatch.adapters.peft import PeftCallHook
from maskpatch.adapters.peft import multitask as peft_multitask
from maskpatch.auto import constants
from maskpatch.hooks import InstallRecord

from helpers import add_prompt_learning, assert_no_residue, encode, residue_snapshot, st_model, with_head

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*not supported for parameter efficient tuning.*"),
    pytest.mark.filterwarnings("ignore:.*[Tt]oken type ids.*"),
    pytest.mark.filterwarnings("ignore::maskpatch.MaskpatchWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
M = 4
ATOL = 1e-5
IDS = torch.tensor([[7, 8, 9, 10, 0, 0, 0], [11, 12, 13, 14, 15, 16, 17]])
MASK = (IDS != 0).long()


def tiny_bert(cls_name: str = "BertModel", **extra):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **extra,
    )
    return getattr(transformers, cls_name)(config).eval()


def prompt_tuned(task: str = "FEATURE_EXTRACTION", *, multitask: bool = False):
    """A tiny BERT PeftModel for ``task`` with M random virtual tokens (multitask prompt tuning: 3 tasks)."""
    from peft import MultitaskPromptTuningConfig, PromptTuningConfig, get_peft_model

    cls_name = {"FEATURE_EXTRACTION": "BertModel", "QUESTION_ANS": "BertForQuestionAnswering"}[task]
    if multitask:
        config = MultitaskPromptTuningConfig(task_type=task, num_virtual_tokens=M, num_tasks=3)
    else:
        config = PromptTuningConfig(task_type=task, num_virtual_tokens=M)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(tiny_bert(cls_name), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in pm.parameters():
            if param.requires_grad:
                param.normal_()
    return pm.eval()


class Prepends(nn.Module):
    """Prepends ``count`` learned tokens to a ``(B, N, D)`` input (``(N, B, D)`` when ``seq_first``)."""

    def __init__(self, count: int = 3, *, seq_first: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.seq_first = seq_first
        self.memory = nn.Parameter(torch.randn(count, 8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        batch_axis = 1 if self.seq_first else 0
        memory = self.memory.unsqueeze(batch_axis).expand(
            *((-1, x.shape[1], -1) if self.seq_first else (x.shape[0], -1, -1))
        )
        return self.proj(torch.cat([memory, x], dim=1 - batch_axis))


# --- 1. the generic path checks lengths --------------------------------------------------------


def test_generic_path_refuses_a_prepended_count_the_output_does_not_show():
    """A module that prepends 3 patched with prepended_tokens=2 raises DriftError instead of cutting a real token."""
    module = Prepends(3)
    with maskpatch.patched(module, policy="strip", prepended_tokens=2):
        with pytest.raises(maskpatch.DriftError, match=r"input has 5 positions.*prepends 2.*7 positions.*\(2, 8, 8\)"):
            module(torch.randn(2, 5, 8))


def test_generic_path_refuses_a_sequence_first_module():
    """A (seq, batch, dim) module would lose batch rows under strip: DriftError names the shapes instead."""
    module = Prepends(2, seq_first=True)
    with maskpatch.patched(module, policy="strip", prepended_tokens=2):
        with pytest.raises(maskpatch.DriftError, match=r"sequence-first"):
            module(torch.randn(4, 5, 8))


def test_generic_path_on_a_peft_model_refuses_a_count_other_than_its_own():
    """prepended_tokens=2 on a PeftModel that prepends 4: DriftError, not two virtual positions kept."""
    pm = prompt_tuned()
    with maskpatch.patched(pm, policy="strip", prepended_tokens=2), torch.no_grad():
        with pytest.raises(maskpatch.DriftError, match=r"input has 7 positions.*9 positions.*11"):
            pm(input_ids=IDS, attention_mask=MASK)


# --- 2. shared modules: one install per module tree ---------------------------------------------


@pytest.fixture
def shared(tiny_model_dir):
    """Two SentenceTransformers sharing one prompt-tuned Transformer, each with its own Pooling."""
    first = add_prompt_learning(st_model(tiny_model_dir("bert"), include_prompt=False), m=M)
    return first, with_head(first[0], include_prompt=False)


def test_removing_a_shared_install_leaves_no_model_half_patched(shared):
    """Following the AlreadyPatchedError's advice unpatches both models whole; every state says so."""
    first, second = shared
    before = residue_snapshot(first, second)
    handle = maskpatch.apply(first)
    with pytest.raises(maskpatch.AlreadyPatchedError, match=r"another model that shares its Transformer"):
        maskpatch.apply(second)
    assert maskpatch.remove(second)
    assert not maskpatch.is_patched(first) and not maskpatch.is_patched(second)
    assert not handle.active and "removed" in repr(handle)
    assert_no_residue(before, first, second)
    with maskpatch.patched(second):  # and the second model can now be patched and is repaired
        alone = encode(second, ["hello world"])
        batch = encode(second, ["hello world", "a much longer sentence that pads the first one in the batch"])
    torch.testing.assert_close(alone[0], batch[0], atol=ATOL, rtol=0)


def test_a_handle_with_a_missing_hook_is_not_active(shared):
    """An install that lost one of its hooks is reported incomplete, not active."""
    first, _ = shared
    handle = maskpatch.apply(first)
    pooling = first[1]
    (key,) = list(pooling._forward_pre_hooks)
    pooling._forward_pre_hooks.pop(key)
    pooling._forward_pre_hooks_with_kwargs.pop(key, None)
    assert not handle.active and "incomplete" in repr(handle)
    handle.remove()


def test_already_patched_messages_name_who_holds_the_install(shared):
    """The message says whether a part, an enclosing model or a sibling sharing a module holds the install."""
    first, second = shared
    with maskpatch.patched(first):
        with pytest.raises(maskpatch.AlreadyPatchedError, match=r"a model that contains Transformer \(Sentence"):
            maskpatch.apply(first[0], policy="strip")
        with pytest.raises(maskpatch.AlreadyPatchedError, match=r"another model that shares its Transformer"):
            maskpatch.apply(second, policy="strip")
    with maskpatch.patched(first[0]):
        with pytest.raises(maskpatch.AlreadyPatchedError, match=r"a part of SentenceTransformer \(Transformer"):
            maskpatch.apply(first)


# --- 3. the question-answering loss frame -----------------------------------------------------------


def span_loss_literal(start_logits: Tensor, end_logits: Tensor, start: list[int], end: list[int]) -> Tensor:
    """The QA loss written out: mean over rows of -log softmax at each target; None targets are left out."""

    def one(logits: Tensor, targets: list[int | None]) -> Tensor:
        terms = [-torch.log_softmax(logits[b], dim=0)[t] for b, t in enumerate(targets) if t is not None]
        return torch.stack(terms).mean()

    return (one(start_logits, start) + one(end_logits, end)) / 2


@pytest.mark.parametrize("policy", ["extend", "ignore", "strip"])
def test_question_answering_loss_is_the_callers_frame_loss(policy):
    """out.loss equals the loss of the returned real-position logits; -1 means the first real token, N is ignored."""
    pm = prompt_tuned("QUESTION_ANS")
    n = IDS.shape[1]
    start, end = torch.tensor([-1, 2]), torch.tensor([3, n])
    with maskpatch.patched(pm, policy=policy), torch.no_grad():
        out = pm(input_ids=IDS, attention_mask=MASK, start_positions=start, end_positions=end)
    cut = 0 if policy == "strip" else M
    real_start, real_end = out.start_logits[:, cut:], out.end_logits[:, cut:]
    assert real_start.shape[1] == n
    expected = span_loss_literal(real_start, real_end, [0, 2], [3, None])
    torch.testing.assert_close(out.loss, expected, atol=ATOL, rtol=0)


def test_question_answering_loss_keeps_the_tuple_order():
    """With return_dict=False the loss comes first, as transformers returns it."""
    pm = prompt_tuned("QUESTION_ANS")
    with maskpatch.patched(pm, policy="strip"), torch.no_grad():
        out = pm(
            input_ids=IDS,
            attention_mask=MASK,
            start_positions=torch.tensor([1, 2]),
            end_positions=torch.tensor([3, 4]),
            return_dict=False,
        )
    assert out[0].dim() == 0 and out[1].shape == IDS.shape


# --- 4. a swapped inner model --------------------------------------------------------------------


def test_remove_reaches_a_peft_model_swapped_out_since_apply(tiny_model_dir):
    """st[0].model replaced after apply: remove() still takes the hook off the old PeftModel, which can be patched again."""
    model = add_prompt_learning(st_model(tiny_model_dir("bert")), m=M)
    old = model[0].model
    before = residue_snapshot(old)
    handle = maskpatch.apply(model)
    model[0].model = prompt_tuned()
    handle.remove()
    assert_no_residue(before, old)
    with maskpatch.patched(old, policy="strip"):
        assert maskpatch.is_patched(old)


# --- 5. doctor on a bad config ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "found"),
    [
        ("[1, 2]", "JSON list"),
        ('"SentenceTransformer"', "JSON str"),
        ('{"model_type": "__version__"}', "'__version__'"),
        ('{"model_type": "util"}', "'util'"),
        ('{"model_type": 3}', "3"),
    ],
)
def test_doctor_refuses_a_bad_config_with_one_line_and_exit_2(tmp_path, capsys, config, found):
    """Valid JSON that is not an object, or a model_type the doctor does not load: exit 2, one line, no lookup."""
    from maskpatch.cli import doctor

    (tmp_path / "config_sentence_transformers.json").write_text(config)
    assert doctor.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("maskpatch doctor: error: expected") and found in err[0]


# --- 6. non-tensor inputs ---------------------------------------------------------------------------


def test_list_position_ids_are_accepted_like_a_tensor():
    """Unpatched PEFT accepts list position_ids; patched, a list gives what the same tensor gives."""
    pm = prompt_tuned()
    positions = [list(range(IDS.shape[1]))] * 2
    with torch.no_grad():
        pm(input_ids=IDS, attention_mask=MASK, position_ids=positions)  # upstream accepts it
        with maskpatch.patched(pm, policy="strip"):
            as_list = pm(input_ids=IDS, attention_mask=MASK, position_ids=positions).last_hidden_state
            as_tensor = pm(input_ids=IDS, attention_mask=MASK, position_ids=torch.tensor(positions)).last_hidden_state
    assert torch.equal(as_list, as_tensor)


@pytest.mark.parametrize("mask", [[[1, 1, 0]], np.ones((1, 3)), None], ids=["list", "ndarray", "None"])
def test_non_tensor_masks_are_refused_naming_expected_and_found(mask):
    """output_mask and prepended_mask refuse a list, an array or None with a MaskpatchError naming both."""
    pm = prompt_tuned()
    module = Prepends(3)
    found = {list: "list", np.ndarray: "numpy.ndarray", type(None): "None"}[type(mask)]
    with maskpatch.patched(pm), maskpatch.patched(module, prepended_tokens=3):
        for call in (lambda: maskpatch.output_mask(pm, mask), lambda: maskpatch.prepended_mask(module, mask)):
            with pytest.raises(maskpatch.MaskpatchError, match=rf"expected \w+ to be a torch.Tensor.*but got {found}"):
                call()


# --- 7. torch.compile ------------------------------------------------------------------------------------


def test_a_compiled_peft_model_is_patched_through_its_original():
    """apply(torch.compile(pm)) patches pm: the compiled output follows the policy; remove() is exact."""
    pm = prompt_tuned()
    compiled = torch.compile(pm, backend="eager")
    with torch.no_grad():
        bare = compiled(input_ids=IDS, attention_mask=MASK).last_hidden_state
    before = residue_snapshot(pm)  # after the first compiled call: dynamo patches torch's own classes once
    with torch.no_grad():
        with maskpatch.patched(compiled, policy="strip") as handle:
            assert maskpatch.is_patched(pm) and handle.active
            stripped = compiled(input_ids=IDS, attention_mask=MASK).last_hidden_state
            eager = pm(input_ids=IDS, attention_mask=MASK).last_hidden_state
        after = compiled(input_ids=IDS, attention_mask=MASK).last_hidden_state
    assert stripped.shape[1] == IDS.shape[1] and torch.allclose(stripped, eager, atol=ATOL)
    assert torch.equal(after, bare)
    assert_no_residue(before, pm)


# --- 8. strict stays strict ---------------------------------------------------------------------------


def test_strict_with_a_bad_policy_fails_a_retried_import_too(tmp_path):
    """MASKPATCH_STRICT=1, MASKPATCH_POLICY=banana: the second `import peft` raises like the first."""
    (tmp_path / "peft.py").write_text("")
    code = f"""
        import os, sys
        sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]
        os.environ.update(MASKPATCH_AUTO="1", MASKPATCH_STRICT="1", MASKPATCH_POLICY="banana")
        from maskpatch.auto import bootstrap
        assert bootstrap.__file__.startswith({str(ROOT)!r})
        bootstrap.start()
        results = []
        for attempt in range(2):
            try:
                import peft
                results.append("imported")
            except Exception as exc:
                results.append(type(exc).__name__)
        print(results)
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKPATCH_") and k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['PolicyError', 'PolicyError']"


# --- 9. huge values ------------------------------------------------------------------------------------


def test_a_huge_auto_value_is_not_quoted_whole_in_the_start_up_warning():
    """A 100 KB MASKPATCH_AUTO gives a warning of a few hundred characters that still names the variable."""
    settings = constants.read_settings({"MASKPATCH_AUTO": "x" * 100_000, "MASKPATCH_POLICY": "y" * 100_000})
    message = settings.describe_problems()
    assert "MASKPATCH_AUTO=" in message and "100000 characters" in message and len(message) < 400


def test_a_huge_prepended_count_is_refused_at_apply():
    """prepended_tokens=10**30 raises PolicyError at apply, and the module is left untouched."""
    module = Prepends(3)
    before = residue_snapshot(module)
    with pytest.raises(maskpatch.PolicyError, match=r"positive int \(at most 2\*\*63 - 1\)"):
        maskpatch.apply(module, prepended_tokens=10**30)
    assert_no_residue(before, module)


# --- 10. exact undo ----------------------------------------------------------------------------------------


@pytest.fixture
def pristine_peft_class():
    """Start from PeftModel.disable_adapter as PEFT defines it (an earlier install may have left a wrapper)."""
    import peft  # noqa: F401

    peft_adapter.remove_disable_adapter_wrapper()
    yield


def test_the_disable_adapter_wrapper_goes_with_the_last_install(pristine_peft_class, tiny_model_dir):
    """PeftModel.disable_adapter is PEFT's own again once the last of two installs is removed."""
    pm = prompt_tuned()
    st = add_prompt_learning(st_model(tiny_model_dir("bert")), m=M)
    before, classes = residue_snapshot(pm), residue_snapshot()
    first, second = maskpatch.apply(pm), maskpatch.apply(st)
    first.remove()
    with torch.no_grad(), st[0].model.disable_adapter():  # still works on the patched encoder
        pass  # (PEFT itself leaves `forward` in that PeftModel's __dict__: only the classes are compared there)
    second.remove()
    assert_no_residue(before, pm)
    assert_no_residue(classes)


def test_plan_changes_nothing_not_even_a_class(pristine_peft_class, tiny_model_dir):
    """An adapter's plan (also the probe of an apply that then raises) installs no class wrapper."""
    st = add_prompt_learning(st_model(tiny_model_dir("bert")), m=M)
    before = residue_snapshot(st)
    for adapter in maskpatch.registered_adapters():
        if adapter.matches(st[0].model) or adapter.matches(st):
            target = st if adapter.name == "sentence-transformers" else st[0].model
            adapter.plan(target, InstallRecord("extend", adapter.name, pinned=False))
    assert_no_residue(before, st)
    handle = maskpatch.apply(st[0].model)
    with pytest.raises(maskpatch.AlreadyPatchedError):
        maskpatch.apply(st)
    handle.remove()
    assert_no_residue(before, st)


def test_a_forward_running_while_remove_happens_leaves_no_route_or_hook(pristine_peft_class):
    """remove() during a multitask forward (here: from inside it): afterwards no hook, no route, not patched."""
    pm = prompt_tuned(multitask=True)
    token = peft_multitask._ROUTES.set(())
    before = residue_snapshot(pm)
    handle = maskpatch.apply(pm)
    user_hook = pm.base_model.register_forward_pre_hook(lambda module, args: handle.remove())
    try:
        with torch.no_grad():
            pm(input_ids=IDS, attention_mask=MASK, task_ids=torch.tensor([0, 2]))
    finally:
        user_hook.remove()
    try:
        assert peft_multitask._ROUTES.get() == ()
        assert not maskpatch.is_patched(pm)
        assert_no_residue(before, pm)
    finally:
        peft_multitask._ROUTES.reset(token)


def test_a_pre_hook_running_after_its_remove_registers_nothing(pristine_peft_class):
    """A PeftCallHook that a forward still calls after remove() registers no TaskIdsHook and pushes no route."""
    pm = prompt_tuned(multitask=True)
    token = peft_multitask._ROUTES.set(())
    before = residue_snapshot(pm)
    handle = maskpatch.apply(pm)
    hook = next(h for h in pm._forward_pre_hooks.values() if isinstance(h, PeftCallHook))
    handle.remove()
    try:
        hook(pm, (), {"input_ids": IDS, "attention_mask": MASK, "task_ids": torch.tensor([0, 2])})
        assert peft_multitask._ROUTES.get() == ()
        assert not maskpatch.is_patched(pm)
        assert_no_residue(before, pm)
    finally:
        peft_multitask._ROUTES.reset(token)

"""One patched model, many threads.

Invariants protected, on a prompt-tuned tiny BERT inside a SentenceTransformer (M = 4):

* several threads encoding through one patched model at once each get the embeddings the model
  gives for those texts on one thread (batch invariant, so independent of what else is in flight);
* ``patched()`` blocks entered from several threads on one model share one install: the model
  stays patched while any block is open, whichever thread opened it, and is exactly unpatched (same
  ``__dict__`` keys and hook dicts as before, bit-identical outputs) when the last block exits,
  also when the blocks open and close in random interleavings.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn

import maskpatch

from helpers import add_prompt_learning, assert_no_residue, encode, residue_snapshot, st_model, state

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*not supported for parameter efficient tuning.*"),
    pytest.mark.filterwarnings("ignore:.*token_type_ids.*"),
]

M = 4
TEXTS = [
    "hello world",
    "a considerably longer sentence, so that the first one gets padded in a batch",
    "short one",
    "three words here",
    "another sentence of a middling length for the batch",
]
TIMEOUT = 120


@pytest.fixture
def st(tiny_model_dir):
    return add_prompt_learning(st_model(tiny_model_dir("bert")), m=M)


def run_threads(count: int, target: Callable[[int], None]) -> None:
    """Run ``target(i)`` on ``count`` threads; re-raise the first exception any of them raised."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


def references(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each text encoded alone, on this thread."""
    return {text: encode(model, [text])[0] for text in TEXTS}


def check_batch(model: nn.Module, texts: list[str], refs: dict[str, torch.Tensor]) -> None:
    out = encode(model, texts)
    for row, text in zip(out, texts, strict=True):
        gap = float((row - refs[text]).abs().max())
        assert gap <= 1e-5, f"{text!r}: {gap}"


@pytest.mark.parametrize("policy", maskpatch.POLICIES)
def test_threads_encoding_through_one_patched_model_get_correct_embeddings(st, policy):
    """Four threads encode different padded batches at once; every row equals that text encoded alone."""
    maskpatch.apply(st, policy=policy)
    refs = references(st)
    start = threading.Barrier(4)

    def work(i: int) -> None:
        start.wait(TIMEOUT)
        for step in range(6):
            rng = random.Random(i * 100 + step)
            check_batch(st, rng.sample(TEXTS, k=rng.randint(2, len(TEXTS))), refs)

    run_threads(4, work)
    assert maskpatch.is_patched(st)


def test_patched_blocks_on_several_threads_share_one_install_until_the_last_exits(st):
    """Blocks opened on 4 threads, closed one by one: patched until the last closes, then exactly as before."""
    before, unpatched = state(st), encode(st, TEXTS)
    with maskpatch.patched(st, policy="ignore"):
        refs = references(st)
    assert state(st) == before
    inside = threading.Barrier(5)
    may_exit = [threading.Event() for _ in range(4)]
    exited = [threading.Event() for _ in range(4)]

    def work(i: int) -> None:
        with maskpatch.patched(st, policy="ignore"):
            inside.wait(TIMEOUT)
            check_batch(st, TEXTS, refs)
            assert may_exit[i].wait(TIMEOUT)
            check_batch(st, TEXTS[i:], refs)
        exited[i].set()

    runner = threading.Thread(target=run_threads, args=(4, work))
    runner.start()
    inside.wait(TIMEOUT)
    for i in range(4):
        assert maskpatch.is_patched(st), f"unpatched while {4 - i} blocks are still open"
        may_exit[i].set()
        assert exited[i].wait(TIMEOUT)
    runner.join(TIMEOUT)
    assert not maskpatch.is_patched(st)
    assert state(st) == before
    assert torch.equal(encode(st, TEXTS), unpatched)


def test_random_interleavings_of_patched_blocks_leave_the_model_exactly_unpatched(st):
    """8 threads open and close patched() blocks 10 times each at random; inside, results are always right."""
    before, unpatched = state(st), encode(st, TEXTS)
    residue = residue_snapshot(st)
    with maskpatch.patched(st, policy="strip"):
        refs = references(st)
    start = threading.Barrier(8)

    def work(i: int) -> None:
        rng = random.Random(i)
        start.wait(TIMEOUT)
        for _ in range(10):
            with maskpatch.patched(st, policy="strip"):
                check_batch(st, rng.sample(TEXTS, k=2), refs)

    run_threads(8, work)
    assert not maskpatch.is_patched(st)
    assert state(st) == before
    assert_no_residue(residue, st)
    assert torch.equal(encode(st, TEXTS), unpatched)

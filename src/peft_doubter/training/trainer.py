"""`DoubterTrainer`: TRL's `SFTTrainer` for the Doubter's two-pass loss.

The loss is the completion-only cross-entropy. LM-head logits are computed only in the target columns (prompts are
aligned to end in one column, so the targets of a batch share a few columns): Gemma's vocabulary has 262k entries,
so full logits would dominate time and memory. TRL's fused LM head does the same job but measured several times
slower than the full-logits step on CPU here (`benchmarks/bench_training.py`), so `compute_loss` slices logits
through `logits_to_keep` instead. Rows carrying cached pass-1 features (`pass1_features`) run pass 2 only. Gates and
token preferences learn `gate_lr_multiplier` times faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm
from transformers import EarlyStoppingCallback
from trl import SFTTrainer

from ..data.sequences import align_prompts, target_columns
from ..tuner.model import DoubterModel
from .config import DoubterSFTConfig


FAST_PARAMETERS = ("gate", "gates", "token_preference")


@dataclass
class DoubterCollator:
    """Batches prompt+target rows with aligned prompt ends (see `align_prompts`); stacks cached pass-1 features
    when the rows carry them and they are used."""

    pad_token_id: int
    use_cached_features: bool = True

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = align_prompts(list(rows), self.pad_token_id)
        if self.use_cached_features and "pass1_features" in rows[0]:
            batch["pass1_features"] = torch.stack([torch.as_tensor(row["pass1_features"]) for row in rows]).float()
        return batch


def target_loss(model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None
                ) -> tuple[torch.Tensor, Any]:
    """(mean cross-entropy over target tokens, model outputs), with LM-head logits only in the target columns."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    columns = target_columns(labels)
    outputs = model(**inputs, logits_to_keep=columns.to(labels.device), use_cache=False)
    targets = labels[:, columns + 1]  # (B, K)
    loss = nn.functional.cross_entropy(outputs.logits.float().flatten(0, 1), targets.flatten(),
                                       ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1), outputs


def is_fast_parameter(name: str) -> bool:
    """Scalar gates (encoder and injection) and token preferences."""
    return name.rsplit(".", 1)[-1] in FAST_PARAMETERS


def pretrain_projectors(
    doubter: DoubterModel,
    features: torch.Tensor,
    correct: torch.Tensor,
    epochs: int = 30,
    learning_rate: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> list[float]:
    """Train each read layer's projector as a probe for pass-1 correctness (BCE through a temporary linear head that
    is then discarded), so the encoder starts from features that already carry the signal. Returns each probe's
    final training loss."""
    adapter = doubter.active_adapters[0]
    encoder = doubter.doubter_encoder[adapter]
    device = next(encoder.parameters()).device
    features, targets = features.float().to(device), correct.float().to(device)
    positives = targets.sum().clamp_min(1.0)
    pos_weight = ((len(targets) - positives) / positives).clamp(0.1, 10.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for layer, projector in enumerate(tqdm(encoder.projectors, desc="Pre-training projectors", unit="layer")):
        head = nn.Linear(projector.linear.out_features, 1).to(device)
        optimizer = torch.optim.Adam([*projector.parameters(), *head.parameters()], lr=learning_rate)
        criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        loss = torch.tensor(float("nan"))
        for _ in range(epochs):
            order = torch.randperm(len(targets), generator=generator).to(device)
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                loss = criterion(head(projector(features[index, layer])).squeeze(-1), targets[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        losses.append(loss.item())
    return losses


class DoubterTrainer(SFTTrainer):
    """Trains a Doubter adapter (`get_peft_model(model, DoubterConfig(...))`) on rows from
    `peft_doubter.training.targets.build_training_set`. Works like `SFTTrainer`: `train(resume_from_checkpoint=...)`,
    `evaluate()`, `save_model()`, gradient accumulation, 8-bit Adam (`optim="adamw_bnb_8bit"`), `accelerate launch`."""

    _tag_names = ["trl", "sft", "peft-doubter", "selective-prediction"]

    def __init__(
        self,
        model: PeftModel,
        args: Optional[DoubterSFTConfig] = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Any = None,
        callbacks: Optional[list] = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, PeftModel) or not isinstance(model.base_model, DoubterModel):
            raise TypeError("DoubterTrainer trains a Doubter adapter: pass get_peft_model(model, DoubterConfig(...)).")
        if processing_class is None:
            raise ValueError("DoubterTrainer needs `processing_class` (the base model's tokenizer).")
        args = args or DoubterSFTConfig(output_dir="doubter-output")
        pad = processing_class.pad_token_id if processing_class.pad_token_id is not None else 0
        data_collator = data_collator or DoubterCollator(pad, use_cached_features=args.train_from_cache)
        callbacks = list(callbacks or [])
        if args.early_stopping_patience and args.load_best_model_at_end and eval_dataset is not None:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator, callbacks=callbacks, **kwargs)

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """AdamW (or the configured optimizer) with two groups: weights at `learning_rate`, gates and token
        preferences at `learning_rate * gate_lr_multiplier` (they are few, and tanh compresses their gradients)."""
        if self.optimizer is None:
            model = model or self.model
            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            fast = [p for n, p in trainable if is_fast_parameter(n)]
            slow = [p for n, p in trainable if not is_fast_parameter(n)]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            learning_rate = optimizer_kwargs.pop("lr", self.args.learning_rate)
            groups = [
                {"params": slow, "lr": learning_rate, "weight_decay": self.args.weight_decay},
                {"params": fast, "lr": learning_rate * self.args.gate_lr_multiplier, "weight_decay": 0.0},
            ]
            self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Cross-entropy of the target tokens, with LM-head logits only in the target columns."""
        loss, outputs = target_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def pretrain_projectors(self) -> list[float]:
        """Probe pre-training of the projectors on the training rows' cached features and correctness."""
        rows = self.train_dataset.with_format("torch", columns=["pass1_features", "correct"])[:]
        return pretrain_projectors(
            self.model.base_model, rows["pass1_features"], rows["correct"], self.args.probe_epochs,
            self.args.probe_learning_rate, seed=self.args.seed,
        )

    def train(self, resume_from_checkpoint: Any = None, **kwargs: Any) -> Any:
        """Probe pre-training first (skipped when resuming: the checkpoint holds the pre-trained projectors)."""
        if self.args.pretrain_projectors and not resume_from_checkpoint:
            self.pretrain_projectors()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

"""`DoubterSFTConfig`: TRL's `SFTConfig` with the Doubter's training settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
from trl import SFTConfig


NOTHING_TO_TRAIN = ("`train_injection=False` leaves only the confidence head to train: set `fit_confidence_head=True` "
                    "(with confidence='head').")


@dataclass
class DoubterSFTConfig(SFTConfig):
    """Training arguments of the Doubter: the confidence head's fit and the two-pass loss.

    Which stages run follows the Doubter's confidence unless set (`resolve_stages`): a head (the default Doubter) is
    fit on the cached readings alone, in seconds; a decision or ratio confidence is trained with the two-pass loss.

    Changed defaults of `SFTConfig` (grouped as in TRL):
    - schedule: `learning_rate=2e-4`, cosine with 5% warm-up, 6 epochs with early stopping on validation AUROC of
      the decision confidence;
    - batches: 32 random rows per step (the ranking loss pairs the right and wrong answers of a batch, so rows are
      not grouped by length, which would separate them); no gradient checkpointing: the frozen base's activations of
      a small model fit easily and recomputing them costs a forward pass per step (turn it on for big bases);
    - data: rows are tokenized by `peft_doubter.training.targets` (prompt labels -100) and carry pass-1 features, so TRL's
      dataset preparation is skipped and unused columns are kept for the collator;
    - evaluation and checkpoints every epoch, the best (highest `eval_auroc`) reloaded at the end; no reporting;
    - bf16 only where the hardware supports it (TRL's default would fail on CPU); no pinned memory without an
      accelerator.
    """

    gate_lr_multiplier: float = field(
        default=5.0, metadata={"help": "Learning-rate multiplier of the gates and token preferences."}
    )
    pretrain_projectors: bool = field(
        default=True,
        metadata={"help": "Pre-train each encoder projector as a correctness probe before the main training."},
    )
    probe_epochs: int = field(default=30, metadata={"help": "Epochs of projector probe pre-training."})
    probe_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of probe pre-training."})
    fit_confidence_head: Optional[bool] = field(
        default=None,
        metadata={"help": "With confidence='head': first fit the encoder and its head on the confidence alone from "
                          "the cached readings (epoch chosen on the eval set's AUROC; replaces projector "
                          "pre-training), then freeze them, so the LM stage trains the injection only, without the "
                          "confidence loss, and checkpoints on eval loss (an `auroc` metric is changed to `loss`). "
                          "Default: true for a Doubter with confidence='head', else false."},
    )
    train_injection: Optional[bool] = field(
        default=None,
        metadata={"help": "Train the injection with the two-pass loss (the LM stage; after `fit_confidence_head` "
                          "if that is on). False stops after the head's fit (seconds): the injection keeps its "
                          "identity start, so pass 2 writes what the base writes, and the Doubter is used "
                          "thresholded (the base's own answer where the head's confidence reaches the threshold, "
                          "else the refusal). Default: false when the head is fit, else true."},
    )
    head_epochs: int = field(default=8, metadata={"help": "Epochs of `fit_confidence_head`."})
    head_learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate of `fit_confidence_head`."})
    early_stopping_patience: Optional[int] = field(
        default=2, metadata={"help": "Stop after this many evaluations without improvement (None: never)."}
    )
    train_from_cache: bool = field(
        default=True,
        metadata={"help": "Feed cached pass-1 features (pass 2 only). False runs both passes every step."},
    )
    confidence_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the class-balanced BCE on the confidence (confidence='decision' or 'head')."},
    )
    ranking_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the pairwise ranking loss on the confidence (AUROC's surrogate)."},
    )

    learning_rate: float = field(default=2e-4, metadata={"help": "Base learning rate (AdamW)."})
    lr_scheduler_type: Union[SchedulerType, str] = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_ratio: Optional[float] = field(default=0.05, metadata={"help": "Share of steps for linear warm-up."})
    num_train_epochs: float = field(default=6.0, metadata={"help": "Maximum epochs (early stopping guards)."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Evaluation batch size per device."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass (saves memory on big bases)."}
    )
    eval_strategy: Union[IntervalStrategy, str] = field(default="epoch", metadata={"help": "When to evaluate."})
    save_strategy: Union[SaveStrategy, str] = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "Checkpoints kept."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Reload the best checkpoint."})
    metric_for_best_model: Optional[str] = field(
        default="auroc", metadata={"help": "Checkpoint selection: validation AUROC of the confidence."}
    )
    greater_is_better: Optional[bool] = field(default=True, metadata={"help": "Higher AUROC is better."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N steps."})
    report_to: Union[None, str, list[str]] = field(default="none", metadata={"help": "Integrations to report to."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the collator's columns."})
    train_sampling_strategy: str = field(
        default="random", metadata={"help": "Random batches (grouping by length would separate right and wrong)."}
    )
    dataset_kwargs: Optional[dict[str, Any]] = field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata={"help": "Rows come tokenized from `peft_doubter.training.targets`."},
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:  # TRL turns bf16 on by default; only where the hardware has it
            self.bf16 = not self.fp16 and not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False
        super().__post_init__()
        if self.gate_lr_multiplier <= 0:
            raise ValueError(f"`gate_lr_multiplier` must be > 0, got {self.gate_lr_multiplier}.")
        if self.probe_epochs < 0:
            raise ValueError(f"`probe_epochs` must be >= 0, got {self.probe_epochs}.")
        if self.head_epochs < 1:
            raise ValueError(f"`head_epochs` must be >= 1, got {self.head_epochs}.")
        if self.train_injection is False and self.fit_confidence_head is False:
            raise ValueError(NOTHING_TO_TRAIN)

    def resolve_stages(self, confidence: str) -> None:
        """Fill `fit_confidence_head` and `train_injection` left unset from the Doubter's `confidence` (a head is fit
        on its own and used thresholded; any other confidence is trained with the two-pass loss)."""
        if self.fit_confidence_head is None:
            self.fit_confidence_head = confidence == "head"
        if self.train_injection is None:
            self.train_injection = not self.fit_confidence_head
        if not self.train_injection and not self.fit_confidence_head:
            raise ValueError(NOTHING_TO_TRAIN)
        if self.fit_confidence_head and self.metric_for_best_model in ("auroc", "eval_auroc"):
            self.metric_for_best_model, self.greater_is_better = "loss", False  # the frozen head's AUROC is constant

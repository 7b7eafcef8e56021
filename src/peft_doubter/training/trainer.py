"""`DoubterTrainer`: TRL's `SFTTrainer` for the Doubter's two-pass loss.

The loss is the completion-only cross-entropy plus, for the decision confidence, a loss on the number that is
evaluated: class-balanced BCE of the decision log-odds against the oracle and a pairwise logistic ranking loss
(every right answer above every wrong one in the batch: AUROC's surrogate). LM-head logits are computed only at the
supervised positions (prompts are aligned to end in one column, so the targets of a batch share a few columns, and
the decision is read in the first of them): Gemma's vocabulary has 262k entries, so full logits would dominate time
and memory. Rows carrying pass 1's cached reading (`pass1_features`) run pass 2 only, and rows carrying the cached
states entering the first inject layer (`prefix_hidden`) start pass 2 there. Checkpoints are chosen on validation
AUROC of the decision confidence. Gates and token preferences learn `gate_lr_multiplier` times faster. With
`fit_confidence_head` (confidence='head') the encoder and head are fit on the confidence alone first
(`fit_confidence_head`, from the cached readings) and frozen, and the two-pass loss trains the injection only
(or nothing more, with `train_injection=False`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from peft import PeftModel
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm
from transformers import EarlyStoppingCallback, EvalPrediction, TrainerCallback
from transformers.trainer_utils import TrainOutput
from trl import SFTTrainer

from ..data.sequences import align_prompts, cached_reading, target_columns
from ..tuner.backbone import text_config
from ..tuner.capture import forward_replaced
from ..tuner.confidence import answer_log_odds
from ..tuner.model import DoubterModel
from .config import DoubterSFTConfig
from .fused_head import logit_transform, picked_log_probs
from .targets import READING_COLUMNS


FAST_PARAMETERS = ("gate", "gates", "token_preference")


@dataclass
class DoubterCollator:
    """Batches prompt+target rows with aligned prompt ends (see `align_prompts`), with pass 1's cached reading
    (when used), the cached lower-layer states (when the rows carry them), the oracle and the refusal's first
    token."""

    pad_token_id: int
    use_cached_features: bool = True

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        cached = self.use_cached_features and "pass1_features" in rows[0]
        batch: dict[str, Any] = align_prompts(list(rows), self.pad_token_id,
                                              prefix="prefix_hidden" if cached and "prefix_hidden" in rows[0]
                                              else None)
        if cached:
            batch["pass1_features"] = cached_reading(rows, "pass1_features")
        if "correct" in rows[0]:
            batch["correct"] = torch.tensor([bool(row["correct"]) for row in rows])
            batch["refusal_token"] = torch.tensor([int(row["refusal_token"]) for row in rows])
        return batch


def target_loss(model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None,
                refusal_token: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Any]:
    """(mean cross-entropy over target tokens, model outputs). The LM head runs only at the supervised positions
    and keeps no full-vocabulary logits (`picked_log_probs`): `outputs.target_log_probs` (N,) are the targets'
    log-probabilities, row by row, and with `refusal_token` (B,) `outputs.refusal_log_probs` (B,) the refusal's at
    each row's last prompt position, where the decision is read (prompts are aligned: the first target column)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    columns = target_columns(labels)
    targets = labels[:, columns + 1]  # (B, K)
    supervised = targets != -100
    if not supervised[:, 0].all():
        raise ValueError("Every row needs a target token right after its prompt (align the prompts' ends).")
    unwrapped = getattr(model, "module", model)
    lm_head = unwrapped.get_output_embeddings()
    kept: list[torch.Tensor] = []

    def keep_states(hidden: torch.Tensor) -> torch.Tensor:
        kept.append(hidden[supervised.to(hidden.device)])
        return kept[0]  # in the outputs, so that DDP finds the parameters the loss depends on

    with forward_replaced(lm_head, keep_states):
        outputs = model(**inputs, logits_to_keep=columns.to(labels.device), use_cache=False)
    outputs.logits = None  # the states, through the family's logit transform: not logits
    picks = targets[supervised][:, None]
    if refusal_token is not None:  # each position's row's refusal token (only the first position's is read)
        row_of = supervised.nonzero()[:, 0]
        picks = torch.cat([picks, refusal_token.to(picks.device)[row_of][:, None]], 1)
    log_probs = picked_log_probs(kept[0], lm_head, picks.to(kept[0].device), *logit_transform(text_config(unwrapped)))
    outputs.target_log_probs = log_probs[:, 0]
    if refusal_token is not None:
        per_row = supervised.sum(1)
        outputs.refusal_log_probs = log_probs[(per_row.cumsum(0) - per_row).to(log_probs.device), 1]
    count = num_items_in_batch if num_items_in_batch is not None else len(picks)
    loss = -outputs.target_log_probs.sum()
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1), outputs


def confidence_loss(log_odds: torch.Tensor, correct: torch.Tensor, pos_weight: float, bce_weight: float,
                    ranking_weight: float) -> torch.Tensor:
    """Class-balanced BCE of the log-odds against the oracle plus the pairwise logistic ranking loss
    mean softplus(d_wrong - d_right) over the batch's (right, wrong) pairs (0 without both classes)."""
    target = correct.float()
    bce = nn.functional.binary_cross_entropy_with_logits(
        log_odds, target, pos_weight=torch.as_tensor(pos_weight, device=log_odds.device))
    right, wrong = log_odds[correct.bool()], log_odds[~correct.bool()]
    ranking = (nn.functional.softplus(wrong[None, :] - right[:, None]).mean() if len(right) and len(wrong)
               else log_odds.new_zeros(()))
    return bce_weight * bce + ranking_weight * ranking


def auroc_metric(prediction: EvalPrediction) -> dict[str, float]:
    """Validation AUROC of the decision confidence (NaN with one class)."""
    scores, correct = np.asarray(prediction.predictions).ravel(), np.asarray(prediction.label_ids).ravel()
    return {"auroc": float(roc_auc_score(correct, scores)) if 0 < correct.sum() < len(correct) else float("nan")}


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


@dataclass
class HeadFit:
    """What `fit_confidence_head` kept: the epoch with the best validation AUROC and every epoch's AUROC."""

    epoch: int
    val_auroc: float
    val_aurocs: list[float]

    def log_entry(self) -> dict[str, Any]:
        return {"head_fit_epoch": self.epoch, "head_fit_val_auroc": self.val_auroc,
                "head_fit_val_aurocs": self.val_aurocs}


def fit_confidence_head(
    encoder: nn.Module,
    train_rows: Sequence[dict[str, Any]],
    val_rows: Sequence[dict[str, Any]],
    *,
    features_key: str = "pass1_features",
    epochs: int = 8,
    learning_rate: float = 3e-4,
    batch_size: int = 32,
    seed: int = 0,
) -> HeadFit:
    """Train a `CognitiveEncoder` built with `confidence='head'` and its head on the confidence alone: class-balanced
    BCE of the head's log-odds against pass-1 correctness, from cached readings (rows with `features_key`, the
    `attentive` encoder's answer states and signals, and `correct`), AdamW with weight decay 0.01. The weights of
    the epoch with the best validation AUROC are restored. No base model runs: minutes on a CPU."""
    if encoder.confidence_head is None:
        raise ValueError("`fit_confidence_head` fits the head of an encoder built with confidence='head'.")
    device = next(encoder.parameters()).device
    labels = torch.tensor([float(row["correct"]) for row in train_rows], device=device)
    val_correct = np.array([bool(row["correct"]) for row in val_rows])
    if not 0 < labels.sum() < len(labels) or not 0 < val_correct.sum() < len(val_correct):
        raise ValueError("Fitting the confidence head needs right and wrong answers in both train and val rows.")
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(1 - labels.mean()) / labels.mean())
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=learning_rate, weight_decay=0.01)
    generator = np.random.default_rng(seed)

    def log_odds(rows: Sequence[dict[str, Any]]) -> torch.Tensor:
        reading = cached_reading(rows, features_key).to(device)
        return encoder.confidence_log_odds(encoder(reading))

    val_aurocs, best_state = [], None
    for epoch in range(1, epochs + 1):
        encoder.train()
        order = generator.permutation(len(train_rows))
        for start in tqdm(range(0, len(order), batch_size), desc=f"Fitting the confidence head, epoch {epoch}",
                          leave=False):
            batch = order[start:start + batch_size]
            loss = loss_fn(log_odds([train_rows[i] for i in batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        encoder.eval()
        with torch.no_grad():
            scores = torch.cat([log_odds(val_rows[i:i + 64]) for i in range(0, len(val_rows), 64)])
        val_aurocs.append(float(roc_auc_score(val_correct, scores.float().cpu().numpy())))
        if best_state is None or val_aurocs[-1] > max(val_aurocs[:-1]):
            best_state = {name: value.detach().clone() for name, value in encoder.state_dict().items()}
    encoder.load_state_dict(best_state)
    encoder.eval()
    best = int(np.argmax(val_aurocs))
    return HeadFit(epoch=best + 1, val_auroc=val_aurocs[best], val_aurocs=val_aurocs)


class HeadFitLog(TrainerCallback):
    """Writes the confidence head's fit into the log history when training starts (a resumed run finds it in the
    checkpoint's state)."""

    def __init__(self, trainer: DoubterTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.head_fit is not None:
            state.log_history.append({**self.trainer.head_fit.log_entry(), "step": 0})


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
        self.confidence = model.peft_config[model.active_adapter].confidence
        self.step_scored = self.confidence in ("decision", "head")  # the confidence comes out of a training step
        if not self.step_scored and args.metric_for_best_model in ("auroc", "eval_auroc"):
            raise ValueError("Checkpoints are chosen on the validation AUROC of the decision or head confidence; "
                             "with confidence='ratio' set `metric_for_best_model='loss'` and `greater_is_better=False`.")
        args.resolve_stages(self.confidence)
        if args.fit_confidence_head:
            if self.confidence != "head":
                raise ValueError("`fit_confidence_head` fits the confidence head: build the Doubter with "
                                 f"confidence='head' (it has confidence={self.confidence!r}).")
            if not args.train_from_cache or eval_dataset is None or "correct" not in eval_dataset.column_names:
                raise ValueError("`fit_confidence_head` fits on cached readings and chooses its epoch on the eval "
                                 "set: pass an `eval_dataset` with `correct` and keep `train_from_cache=True`.")
        self.head_fit: Optional[HeadFit] = None
        if self.step_scored and kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = auroc_metric
        labelled = train_dataset is not None and "correct" in train_dataset.column_names
        correct = np.asarray(train_dataset["correct"], dtype=bool) if labelled else np.ones(1, dtype=bool)
        self.pos_weight = float(np.clip((~correct).sum() / max(1, correct.sum()), 1.0, 20.0))
        pad = processing_class.pad_token_id if processing_class.pad_token_id is not None else 0
        data_collator = data_collator or DoubterCollator(pad, use_cached_features=args.train_from_cache)
        callbacks = list(callbacks or [])
        if args.early_stopping_patience and args.load_best_model_at_end and eval_dataset is not None:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator, callbacks=callbacks, **kwargs)
        self.add_callback(HeadFitLog(self))

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

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Cross-entropy of the target tokens (the LM head only at the supervised positions), plus the confidence loss
        on the decision (or head) log-odds (`confidence_loss`), divided by the accumulation steps like the LM loss."""
        inputs = dict(inputs)
        correct, refusal_token = inputs.pop("correct", None), inputs.pop("refusal_token", None)
        loss, outputs = target_loss(model, inputs, num_items_in_batch, refusal_token)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        weights = (self.args.confidence_loss_weight, self.args.ranking_loss_weight)
        if self.step_scored and correct is not None and any(weights) and not self.args.fit_confidence_head:
            extra = confidence_loss(self.log_odds(outputs), correct, self.pos_weight, *weights)
            loss = loss + extra / self.args.gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss

    def log_odds(self, outputs: Any) -> torch.Tensor:
        """The confidence's log-odds of a batch: the head's, or the decision's at the first answer position."""
        if self.confidence == "head":
            return outputs.confidence_log_odds
        return answer_log_odds(outputs.refusal_log_probs)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Optional[list[str]] = None) -> tuple[Any, Any, Any]:
        """(loss, confidence log-odds, oracle) of an evaluation batch, for the validation AUROC."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
            if prediction_loss_only or not self.step_scored:
                return loss.detach(), None, None
            scores = self.log_odds(outputs)
        return loss.detach(), scores.detach().float(), inputs["correct"].float()

    def pretrain_projectors(self) -> list[float]:
        """Probe pre-training of the projectors on the training rows' cached features and correctness."""
        rows = self.train_dataset.with_format("torch", columns=["pass1_features", "correct"])[:]
        return pretrain_projectors(
            self.model.base_model, rows["pass1_features"], rows["correct"], self.args.probe_epochs,
            self.args.probe_learning_rate, seed=self.args.seed,
        )

    def fit_confidence_head(self) -> HeadFit:
        """`fit_confidence_head` on the train and eval rows' cached readings (see `DoubterSFTConfig`)."""
        columns = [c for c in ("pass1_features", *READING_COLUMNS, "correct") if c in self.train_dataset.column_names]
        train, val = (list(rows.select_columns(columns).with_format("numpy"))
                      for rows in (self.train_dataset, self.eval_dataset))
        self.head_fit = fit_confidence_head(self.doubter_encoder, train, val, epochs=self.args.head_epochs,
                                            learning_rate=self.args.head_learning_rate, seed=self.args.seed)
        return self.head_fit

    @property
    def doubter_encoder(self) -> nn.Module:
        """The active adapter's cognitive encoder."""
        return self.model.base_model.doubter_encoder[self.model.active_adapter]

    def train(self, resume_from_checkpoint: Any = None, **kwargs: Any) -> Any:
        """Probe pre-training or the confidence head's fit first (skipped when resuming: the checkpoint holds their
        result); with `fit_confidence_head` the encoder and head are then frozen, and with `train_injection=False`
        training ends there (no step, no checkpoint: the fit is in `state.log_history` and the metrics)."""
        if self.args.fit_confidence_head:
            if not resume_from_checkpoint or not self.args.train_injection:  # a head-only run saves no checkpoint
                self.fit_confidence_head()
            self.doubter_encoder.requires_grad_(False)
            if not self.args.train_injection:
                self.state.log_history.append({**self.head_fit.log_entry(), "step": 0})
                return TrainOutput(global_step=0, training_loss=0.0, metrics=self.head_fit.log_entry())
        elif self.args.pretrain_projectors and not resume_from_checkpoint:
            self.pretrain_projectors()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

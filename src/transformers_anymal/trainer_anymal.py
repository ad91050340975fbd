"""The recipes' trainer: TRL's SFTTrainer, with a training loss that, off CUDA and XPU, projects only the positions
that have a label through the language model's head, and can keep text-only answers where the LLM without its LoRA
adapters puts them (`base_kl_weight`)."""

import torch
from torch.nn import functional
from trl import SFTTrainer


# where TRL 1.16's fused loss head has its Triton kernel, which scores only the labelled positions; elsewhere it
# scores every position of the batch
COMPACT_LOSS_DEVICES = ("cuda", "xpu")


class AnyMALSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose training loss, on CPUs (and other devices without TRL's Triton kernel), comes from the
    logits of the positions that have a label only: in an AnyMAL batch most positions are the prompt and its
    media, and projecting them all through a 49k-row head made TRL's loss about a third of a CPU training step.

    The loss is the same: the summed cross-entropy of the labelled positions over their count (or the Trainer's
    `num_items_in_batch`), scaled for data parallelism as TRL scales it. Each row's own labelled positions reach the
    head (`logits_to_keep` as a boolean mask, which transformers' `slice_logits_to_keep` takes), not their union over
    the batch: rows whose answers start at different positions add no logits of each other's. Evaluation, other loss
    types, label smoothing and `compute_loss_func` go through TRL's `compute_loss`, as does everything on CUDA and
    XPU. TRL's `entropy` and `mean_token_accuracy` logs come from its own loss, so a compact step logs the loss alone.

    With `args.base_kl_weight` > 0 (a LoRA-tuned model), every training step takes this loss, on any device, plus
    that weight times the KL divergence from the model with its adapters disabled (the untouched LLM) to the model,
    summed over the answer tokens of the batch's text-only rows (those without placeholder tokens) and divided as
    the cross-entropy is. Instruction tuning on short media answers otherwise drifts a small LLM's answers to plain
    questions (its knowledge); the adapters then learn the media while its text answers stay put.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.base_kl_weight:
            return
        if not hasattr(self.accelerator.unwrap_model(self.model), "disable_adapter"):
            raise ValueError("base_kl_weight compares the model with the same model without its LoRA adapters, and "
                             "this model has none: train with --use_peft, or set base_kl_weight to 0.")
        if not self._plain_cross_entropy():
            raise ValueError("base_kl_weight adds to the plain cross-entropy (loss_type 'nll'), without label "
                             "smoothing, compute_loss_func or an auxiliary loss; drop those or set base_kl_weight to 0.")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._compact_loss(model, inputs, return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        next_labels = functional.pad(labels[:, 1:], (0, 1), value=-100)  # position i predicts token i + 1
        keep = next_labels != -100  # (rows, positions)
        if not keep.any():  # no label in the batch: one position keeps the loss (zero) connected to the model
            keep[0, -1] = True
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (kept positions, vocabulary)
        targets = next_labels[keep]
        loss = functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
        if self.base_kl_weight:
            loss = loss + self.base_kl_weight * self._base_kl(model, inputs, keep, logits, targets)
        count = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as TRL: num_items_in_batch counts every rank's tokens, and DDP averages the gradients over the ranks
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    @property
    def base_kl_weight(self) -> float:
        return getattr(self.args, "base_kl_weight", 0.0)  # AnyMALSFTConfig's; TRL's SFTConfig has none

    def _base_kl(self, model, inputs: dict, keep: torch.Tensor, logits: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
        """KL(untouched LLM || model), summed over the labelled positions (`keep`, a mask of the batch) of the
        text-only rows; `logits` and `targets` are the model's at `keep`."""
        peft_model = self.accelerator.unwrap_model(model)
        anymal = peft_model.get_base_model().model
        text = ~torch.stack([anymal.placeholder_positions(name, inputs["input_ids"], None).any(1)
                             for name in anymal.config.modalities]).any(0)
        if not text.any() or (targets == -100).all():
            return logits.new_zeros(())
        mask = inputs.get("attention_mask")
        with torch.no_grad(), peft_model.disable_adapter():  # no DDP wrapper: nothing of this pass is trained
            base = peft_model(input_ids=inputs["input_ids"][text], attention_mask=None if mask is None else mask[text],
                              use_cache=False, logits_to_keep=keep[text]).logits
        base = base.float().log_softmax(-1)
        tuned = logits[text[:, None].expand_as(keep)[keep]].float().log_softmax(-1)  # the text rows' positions
        return functional.kl_div(tuned, base, log_target=True, reduction="sum")

    def _compact_loss(self, model, inputs, return_outputs) -> bool:
        return (model.training and not return_outputs and inputs.get("labels") is not None
                and (self.accelerator.device.type not in COMPACT_LOSS_DEVICES or self.base_kl_weight)
                and self._plain_cross_entropy())

    def _plain_cross_entropy(self) -> bool:
        """The training loss is TRL's plain token cross-entropy: no other loss type, smoothing or extra term."""
        return (self.args.loss_type == "nll" and self.label_smoother is None and self.compute_loss_func is None
                and not self.aux_loss_enabled)

"""The recipes' trainer: TRL's SFTTrainer, with a training loss that, off CUDA and XPU, projects only the positions
that have a label through the language model's head."""

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
    `num_items_in_batch`), scaled for data parallelism as TRL scales it. The positions kept are the union over the
    batch's rows (a row's own unlabelled ones among them are ignored). Evaluation, other loss types, label
    smoothing and `compute_loss_func` go through TRL's `compute_loss`, as does everything on CUDA and XPU. TRL's
    `entropy` and `mean_token_accuracy` logs come from its own loss, so a compact step logs the loss alone.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._compact_loss(model, inputs, return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        next_labels = functional.pad(labels[:, 1:], (0, 1), value=-100)  # position i predicts token i + 1
        keep = (next_labels != -100).any(0).nonzero().squeeze(-1)
        if keep.numel() == 0:  # no label in the batch: one position keeps the loss (zero) connected to the model
            keep = keep.new_tensor([labels.shape[1] - 1])
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        targets = next_labels[:, keep]
        loss = functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                        reduction="sum")
        count = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as TRL: num_items_in_batch counts every rank's tokens, and DDP averages the gradients over the ranks
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def _compact_loss(self, model, inputs, return_outputs) -> bool:
        return (model.training and not return_outputs and inputs.get("labels") is not None
                and self.accelerator.device.type not in COMPACT_LOSS_DEVICES
                and self.args.loss_type == "nll" and self.label_smoother is None and self.compute_loss_func is None
                and not self.aux_loss_enabled)

"""TRL's training metrics without a wait for the GPU in every micro-step.

TRL's ``SFTTrainer.compute_loss`` reads three numbers back from the GPU in every micro-step
(mean entropy, token accuracy and the token count; on several ranks each gathered from all of
them first). Each read makes the host wait until the GPU has finished the forward pass, and then
the GPU wait while the host queues the backward pass; with several ranks each also waits for the
slowest rank. :class:`DeferredStepMetrics` computes the loss exactly as TRL does, keeps the
metric sums on the GPU and reads them once, when the Trainer logs (every
``training.loggingSteps`` steps), with one all-reduce over the ranks. The token count of a
padding-free micro-step is its length, known on the host; of a padded one, its attention mask's
sum, kept on the GPU with the rest. Entropy and accuracy are then averaged over the tokens of the
logging interval (TRL averages the micro-steps' averages).

Only TRL's plain loss is computed here (negative log-likelihood through its fused LM head, no
custom loss function, label smoothing, auxiliary loss or tensor/sequence parallelism); anything
else, and evaluation, is TRL's own ``compute_loss``.
"""

from __future__ import annotations

from typing import Any


class DeferredStepMetrics:
    """Mixed into TRL's SFTTrainer (before it): ``compute_loss`` and ``log`` as described above.
    The subclass calls :meth:`count_tokens` for every training micro-step."""

    args: Any
    accelerator: Any
    model: Any
    _metrics: Any
    _total_train_tokens: int

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[call-arg]
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        self.defers_metrics = (
            getattr(self, "compute_loss_func", None) is None
            and getattr(self, "label_smoother", None) is None
            and getattr(self.args, "loss_type", "nll") == "nll"
            and not getattr(self, "aux_loss_enabled", False)
            and getattr(self, "_tp_size", 1) == 1
            and not getattr(parallelism, "sp_enabled", False)
        )
        #: On the device: label tokens, entropy sum and correct top-1 predictions so far.
        self._metric_sums: Any = None
        #: Tokens of padded micro-steps whose mask is on the device, summed there.
        self._device_tokens: Any = None
        #: Tokens since the last log counted on the host (padding-free micro-steps).
        self._host_tokens = 0

    def count_tokens(self, inputs: dict[str, Any], padding: int) -> None:
        """The real tokens of one training micro-step (``padding``: its bucket padding). Never
        a device tensor made from a host number: that copy would wait for the GPU too."""
        mask = inputs.get("attention_mask")
        if mask is None and "position_ids" in inputs:
            self._host_tokens += int(inputs["position_ids"].size(1)) - padding
        elif mask is not None and mask.is_cuda:
            total = mask.sum()
            self._device_tokens = (
                total if self._device_tokens is None else self._device_tokens + total
            )
        elif mask is not None:
            self._host_tokens += int(mask.sum())

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if return_outputs or not self.defers_metrics or not self.model.training:
            return super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        import torch

        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (-outputs.log_probs).sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        with torch.no_grad():
            sums = torch.stack(
                [
                    outputs.label_mask.sum().float(),
                    outputs.entropy.detach().sum().float(),
                    outputs.is_top1.sum().float(),
                ]
            )
            self._metric_sums = sums if self._metric_sums is None else self._metric_sums + sums
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and self.defers_metrics:
            self._read_metric_sums()
        super().log(logs, start_time)  # type: ignore[misc]

    def _read_metric_sums(self) -> None:
        """The interval's metrics into TRL's ``_metrics``, read from the GPU (all ranks together:
        every rank logs at the same step)."""
        import torch

        if self._metric_sums is None and self._device_tokens is None and not self._host_tokens:
            return
        device = self.args.device
        totals = torch.tensor([0.0, 0.0, 0.0, float(self._host_tokens)], device=device)
        if self._metric_sums is not None:
            totals[:3] += self._metric_sums
        if self._device_tokens is not None:
            totals[3] += self._device_tokens.float()
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        labelled, entropy, correct, tokens = totals.tolist()
        self._metric_sums, self._device_tokens, self._host_tokens = None, None, 0
        self._total_train_tokens += round(tokens)
        metrics = self._metrics["train"]
        metrics["entropy"] = [entropy / labelled if labelled else 0.0]
        metrics["mean_token_accuracy"] = [correct / labelled if labelled else 0.0]
        metrics["num_tokens"] = [self._total_train_tokens]

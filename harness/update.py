"""The update rule of a training step: what turns one batch's gradients into new weights.

The learning-rate schedule, AdamW and its parameter groups, fp16 loss scaling, the gradient norm and clipping,
the non-finite policy, and the EMA. harness/train.py's loop draws the batch, runs forward and backward through
`UpdateRule.backward`, and calls `UpdateRule.finish`; everything a reader needs to know about how the weights
move is in this file.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn as nn

from harness.errors import HarnessError

log = logging.getLogger(__name__)

class NonFiniteLoss(HarnessError):
    pass


def lr_at(step: int, lr: float, warmup_steps: int, steps: int, schedule: str = "constant") -> float:
    """The learning rate of optimizer step `step` (0-based) of a `steps`-step stage.

    A linear warm-up to `lr` over the first `warmup_steps` steps ((step + 1) / warmup_steps), then `schedule`:
    constant, or a cosine / linear decay from `lr` at the end of the warm-up towards 0 at step `steps`.
    """
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)  # 0 at the first decayed step, < 1 at the last
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return lr * (1.0 - progress)
    raise HarnessError(f"Stage.lr_schedule = {schedule!r}; use 'constant', 'cosine' or 'linear'")


def param_groups(model: nn.Module, weight_decay: float, exempt: str = "vectors_and_embeddings") -> list[dict]:
    """AdamW's parameter groups (Stage.weight_decay_exempt).

    'vectors_and_embeddings': no weight decay on biases, norms and learned embeddings (vectors and the names the
    model lists), the usual ViT practice. 'none': one group, every parameter decayed, as MaskDM's AdamW over
    `diffusion_model.parameters()` (main.py) does.
    """
    if exempt == "none":
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ema-pytorch's defaults, which MaskDM's `EMA(diffusion_model, beta=ema_decay, update_every=1)` leaves in place
# (ema_pytorch.py 0.8.3: `EMA.__init__`, `get_current_decay`, `update`).
EMA_PYTORCH_UPDATE_AFTER_STEP = 100
EMA_PYTORCH_INV_GAMMA = 1.0
EMA_PYTORCH_POWER = 2 / 3
EMA_PYTORCH_MIN_VALUE = 0.0


def ema_decay_at(step: int, decay: float, warmup: bool = True, rule: str = "ratio") -> float:
    """The EMA decay used after optimizer step `step` (0-based); 0.0 means the EMA copies the weights.

    'ratio': min(decay, (1 + step) / (10 + step)). 'ema_pytorch': ema-pytorch's rule with MaskDM's settings.
    Its counter k counts update() calls (k = step here): k = 0 initialises the EMA with a copy, k <= 100 copies
    again, and after that, with epoch = k - 100, decay = clamp(1 - (1 + epoch / inv_gamma) ** -power, min_value,
    decay): 0.37 at step 101, 0.9978 at 10k, and the cap 0.999 from step 31,722 on.
    """
    if not warmup:
        return decay
    if rule == "ratio":
        return min(decay, (1 + step) / (10 + step))
    epoch = step - EMA_PYTORCH_UPDATE_AFTER_STEP
    if epoch <= 0:
        return 0.0
    value = 1 - (1 + epoch / EMA_PYTORCH_INV_GAMMA) ** -EMA_PYTORCH_POWER
    return min(max(value, EMA_PYTORCH_MIN_VALUE), decay)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    if decay == 0.0:  # a copy (ema-pytorch's warm-up steps), exactly
        torch._foreach_copy_(ema_params, [p.detach() for p in model.parameters()])
    else:
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class UpdateRule:
    """One stage's optimizer, loss scaler and EMA, and the rule that moves the weights after each batch.

    `start(step)` sets the step's learning rate and clears the gradients; the loop calls `backward(loss)` for each
    micro-batch and then `finish(step, loss)` with the whole batch's loss (already averaged across ranks).
    """

    def __init__(self, spec: Any, model: nn.Module, ema: nn.Module, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> None:
        self.spec, self.model, self.ema = spec, model, ema
        # The fused kernel (CUDA and CPU) updates each parameter in one multi-threaded pass; on CPU the foreach
        # path is about 4x slower, a fixed per-step cost that eats into what token dropping saves.
        self.optimizer = torch.optim.AdamW(param_groups(model, spec.weight_decay, spec.weight_decay_exempt),
                                           lr=spec.lr, betas=spec.betas, fused=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    @property
    def lr(self) -> float:
        """The learning rate of the last step started."""
        return self.optimizer.param_groups[0]["lr"]

    def start(self, step: int) -> None:
        spec = self.spec
        lr = lr_at(step, spec.lr, spec.warmup_steps, spec.steps, spec.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def finish(self, step: int, loss: torch.Tensor, grad_norm_wanted: bool = True) -> tuple[float, float]:
        """Clip, apply the non-finite policy, step the optimizer and the EMA; returns (loss, grad norm).

        The gradient norm costs a pass over every gradient, so it is computed only when clipping, when wanted
        (the loop asks at its log steps) or under nan_policy 'skip' (a non-finite gradient can come with a
        finite loss, and skipping must catch it); otherwise the grad norm returned is NaN. Under 'stop' without
        it, such a gradient spoils the weights, the next loss is non-finite and the stage stops; the loop never
        checkpoints non-finite weights. With fp16, an overflow is the scaler's to handle: it skips the update and
        lowers its scale.
        """
        spec = self.spec
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        with_norm = spec.grad_clip > 0 or grad_norm_wanted or spec.nan_policy == "skip"
        if with_norm:  # (gradients are all-reduced, so the norm is the same on every rank)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            loss_value, norm_value = torch.stack([loss, grad_norm.to(loss)]).tolist()  # one sync for both
        else:
            loss_value, norm_value = loss.item(), 0.0
        # fp16 overflow: the scaler's to handle. Once its scale has fallen below 1 the gradients are non-finite
        # for another reason, and the nan_policy applies.
        overflow = (self.scaler.is_enabled() and not math.isfinite(norm_value)
                    and self.scaler.get_scale() >= 1.0)
        if not math.isfinite(loss_value) or (not math.isfinite(norm_value) and not overflow):
            self.optimizer.zero_grad(set_to_none=True)
            what = (f"the loss became {loss_value}" if not math.isfinite(loss_value)
                    else f"the gradients became non-finite (loss {loss_value:.4g})")
            if spec.nan_policy == "stop":
                raise NonFiniteLoss(f"stage '{spec.name}': {what} at step {step}; the last good checkpoint is "
                                    "kept (lower the lr, or set Stage.nan_policy = 'skip')")
            log.warning("%s at step %d: batch skipped", what, step)
            self.scaler.update()
            return loss_value, float("nan")
        if not overflow and 0 < spec.grad_clip < norm_value:  # rescaling is another pass: only when it clips
            torch.nn.utils.clip_grads_with_norm_(params, spec.grad_clip, grad_norm)
        self.scaler.step(self.optimizer)  # (skips the update after an fp16 overflow)
        self.scaler.update()
        update_ema(self.ema, self.model, ema_decay_at(step, spec.ema_decay, spec.ema_warmup, spec.ema_warmup_rule))
        return loss_value, norm_value if with_norm else float("nan")

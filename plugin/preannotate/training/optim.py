"""Optimizers and learning-rate schedules named by the hyperparameters, as torch objects the loop checkpoints.

``one-cycle`` is torch's ``OneCycleLR`` (its rise takes ``warmup-steps``, else 30 % of the run, and it cycles
momentum where the optimizer has one). Every other schedule is a ``LambdaLR`` over ``Schedule``, a multiplier of
``initial-learning-rate`` per step, after a linear warm-up from 1/1000 over ``warmup-steps`` (as torchvision's
references warm up):

* ``constant``: 1;
* ``multi-step``: from ``schedule-step-N`` on, ``schedule-lr-N`` (or, without rates, one more factor of
  ``schedule-gamma`` per boundary passed);
* ``step``: ``schedule-gamma`` once every ``schedule-step-size`` steps (default: a third of the run);
* ``exponential``: a smooth decay by ``schedule-gamma`` per ``schedule-step-size`` steps (default: the run);
* ``cosine``: half a cosine from the end of the warm-up to zero at the last step;
* ``on-plateau``: 1, times ``schedule-gamma`` after each validation whose mAP does not beat the best so far by
  ``early-stopping-delta``.

``LambdaLR`` saves and restores a ``Schedule``'s attributes with its own state, plateau decays included. The
Keras adapter sets its optimizer's rate from the same ``Schedule`` at every step (``one-cycle`` there is
``Schedule``'s copy of ``OneCycleLR``'s rate, without the momentum cycling); torch is imported only by the
functions that build torch objects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from preannotate.hyperparameters import Recipe

if TYPE_CHECKING:
    import torch

WARMUP_START = 0.001


FUSED = ("sgd", "adam", "adamw", "adagrad")  # torch has fused (one kernel for all tensors) CPU and CUDA versions


def build_optimizer(parameters: Iterable[torch.nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    """The optimizer of the ``recipe`` over the trainable ``parameters``: fused where torch has it (an AdamW step over
    SSDlite's 266 tensors takes 5 ms on a CPU instead of 22), else the multi-tensor (foreach) version."""
    import torch

    params = [p for p in parameters if p.requires_grad]
    name = recipe.optimizer
    fast = {"fused": True} if name in FUSED and all(p.device.type in ("cpu", "cuda") for p in params) \
        else {"foreach": True}
    options = {"lr": recipe.initial_learning_rate, "weight_decay": recipe.weight_decay, **fast}
    if name in ("sgd", "rmsprop"):
        options["momentum"] = recipe.momentum
    if name == "rmsprop":
        options.update(alpha=recipe.rmsprop_decay, eps=recipe.rmsprop_epsilon)
    classes = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
               "adamw": torch.optim.AdamW, "adamax": torch.optim.Adamax, "adagrad": torch.optim.Adagrad,
               "adadelta": torch.optim.Adadelta}
    return classes[name](params, **options)


class Schedule:
    """The multiplier of the initial learning rate at each step (see the module docstring)."""

    def __init__(self, recipe: Recipe, total_steps: int):
        self.kind, self.total, self.warmup = recipe.schedule, max(1, total_steps), recipe.warmup_steps
        self.gamma, self.step_size = recipe.schedule_gamma, recipe.schedule_step_size
        self.boundaries = list(recipe.schedule_steps)
        self.factors = [lr / recipe.initial_learning_rate for lr in recipe.schedule_lrs]
        self.delta = recipe.early_stopping_delta
        self.plateau_scale, self.plateau_best = 1.0, None
        self.cycle_start, self.cycle_end = recipe.one_cycle_initial_factor, recipe.one_cycle_final_factor

    def __call__(self, step: int) -> float:
        if self.kind == "one-cycle":
            return self.one_cycle(step)
        warm = WARMUP_START + (1 - WARMUP_START) * step / self.warmup if step < self.warmup else 1.0
        return warm * self.main(step)

    def main(self, step: int) -> float:
        if self.kind == "multi-step":
            passed = sum(step >= boundary for boundary in self.boundaries)
            if not passed:
                return 1.0
            return self.factors[passed - 1] if self.factors else self.gamma ** passed
        if self.kind == "step":
            return self.gamma ** (step // (self.step_size or max(1, self.total // 3)))
        if self.kind == "exponential":
            return self.gamma ** (step / (self.step_size or self.total))
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            progress = min(1.0, max(0.0, (step - self.warmup) / span))
            return 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "on-plateau":
            return self.plateau_scale
        return 1.0

    def one_cycle(self, step: int) -> float:
        """``OneCycleLR``'s multiplier (cosine): a rise over ``warmup-steps`` (else 30 % of the run) from
        ``one-cycle-initial-factor`` (torch's 1/``div_factor``, 1/25), then annealing to ``one-cycle-final-factor``
        (1/25/``final_div_factor``, 1/250,000)."""
        start, end = self.cycle_start, self.cycle_end
        rise = min(max((self.warmup + 1) / self.total if self.warmup else 0.3, 0.01), 0.99) * max(2, self.total) - 1
        last = max(2, self.total) - 1
        if step <= rise:
            return end_cos(start, 1.0, step / max(rise, 1e-9))
        return end_cos(1.0, end, (step - rise) / max(last - rise, 1e-9))

    def validated(self, metric: float | None) -> None:
        """Tell the schedule a validation's mAP (``on-plateau`` decays when it did not improve)."""
        if self.kind != "on-plateau" or metric is None:
            return
        if self.plateau_best is None or metric > self.plateau_best + self.delta:
            self.plateau_best = metric
        else:
            self.plateau_scale *= self.gamma


def end_cos(start: float, end: float, progress: float) -> float:
    """From ``start`` to ``end`` along half a cosine, ``progress`` 0 → 1 (clamped)."""
    return end + (start - end) / 2 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, total_steps: int
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule of the ``recipe`` over ``total_steps``; call ``step()`` after every optimizer step."""
    import torch

    if recipe.schedule == "one-cycle":
        # OneCycleLR peaks at step pct_start × total - 1; the other schedules reach the full rate at step warmup
        rise = (recipe.warmup_steps + 1) / total_steps if recipe.warmup_steps else 0.3
        cycles_momentum = "betas" in optimizer.defaults or optimizer.defaults.get("momentum", 0) > 0
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.initial_learning_rate, total_steps=max(2, total_steps),
            pct_start=min(max(rise, 0.01), 0.99), cycle_momentum=cycles_momentum,
            div_factor=1 / recipe.one_cycle_initial_factor,
            final_div_factor=recipe.one_cycle_initial_factor / max(recipe.one_cycle_final_factor, 1e-12))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(recipe, total_steps))


def validated(scheduler: torch.optim.lr_scheduler.LRScheduler, metric: float | None) -> None:
    """Report a validation's mAP to the schedule, then re-apply the rate (on-plateau may have decayed it)."""
    lambdas = getattr(scheduler, "lr_lambdas", ())
    for schedule in lambdas:
        if isinstance(schedule, Schedule):
            schedule.validated(metric)
    if lambdas:
        step = scheduler.last_epoch
        for group, base, schedule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, lambdas, strict=True):
            group["lr"] = base * schedule(step)

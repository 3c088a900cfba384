"""What a torch run owns (``training.loop.FrameworkAdapter``): a torchvision model stepped as torchvision's
``references/detection`` steps it — the model returns its losses in train mode, images and targets are lists,
warm-up, gradient clipping, AMP on CUDA, DistributedDataParallel under ``torchrun`` — checkpoints in ``last.pt``
(model, optimizer, scheduler, AMP scaler, RNG states, the run's state) and ``best.pt``, precise batch norm before each
validation, and COCO mAP (a classifier's accuracy) on the validation frames.

Batches come from ``data.StepBatchSampler``: the order of samples is a function of the step, so a resumed run sees
the very batches it would have seen. ``stage-N-epochs`` (Mask R-CNN's phases) unfreeze the backbone stage by stage.
What a model family knows about itself (which backbone stages to freeze, its input geometry) comes from the registry
and the family, not from here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from preannotate.files import replacing
from preannotate.models import Detector, create_detector, family_of
from preannotate.models.keypoints import KeypointLayout
from preannotate.training import data, optim
from preannotate.training.evaluation import evaluate, evaluate_tags, recalibrate_batch_norm
from preannotate.training.loop import RunSpec, StepOutcome
from preannotate.training.runs import CALIBRATION_FRAMES, TrainState, sample


class Adapter:
    FILES = ("last.pt", "best.pt")

    def __init__(self, spec: RunSpec, device: str | None = None, workers: int | None = None):
        self.spec, self.workers = spec, workers
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        clones = spec.hp.recipe.num_clones
        if clones > 1 and self.world == 1:
            raise RuntimeError(f"num-clones={clones} trains on {clones} GPUs with DistributedDataParallel: start it "
                               f"with torchrun --nproc-per-node={clones} (the same command after it)")
        if self.world > 1:
            spec.hp = spec.hp.replaced(num_clones=self.world)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.main = self.rank == 0
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.tags = spec.arch.output == "tag"
        self.with_masks = spec.arch.output == "mask"
        self.with_keypoints = spec.arch.output == "skeleton"
        self.checkpoint, self.best = spec.output / "last.pt", spec.output / "best.pt"
        self.stage: int | None = None

    def shared(self, value: Any) -> Any:
        if self.world == 1:
            return value
        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    # ------------------------------------------------------------------------------------------------ the model

    def build(self) -> TrainState | None:
        spec, hp = self.spec, self.spec.hp
        torch.manual_seed(hp.recipe.seed)
        self.detector = create_detector(spec.arch.name, spec.labels, init=hp.recipe.init, hyperparameters=hp,
                                        previous=spec.previous, device=str(self.device))
        model = self.model = self.detector.model
        self.phased = hp.recipe.trainable_layers_at(0, len(spec.train_items)) is not None
        # with stage-N-epochs every weight joins the optimizer; each stage then decides which ones have gradients
        self.frozen_norms = [] if self.phased else family_of(spec.arch).freeze_backbone(
            model, hp.recipe.trainable_backbone_layers, hp.recipe.init)
        self.optimizer = optim.build_optimizer(model.parameters(), hp.recipe)
        self.scheduler = optim.build_scheduler(self.optimizer, hp.recipe, spec.total)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.device.type == "cuda")
        self.trained = model
        if self.world > 1:
            self.trained = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.phased)
        self.val_loader = self._val_loader() if self.main and spec.val_items else None
        self.calibration = self._calibration_loader() if self.main else None
        return self._restore()

    def _restore(self) -> TrainState | None:
        if not self.checkpoint.exists():
            return None
        checkpoint = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        _set_rng_state(checkpoint["rng"])
        names = {f.name for f in dataclasses.fields(TrainState)}
        return TrainState(**{k: v for k, v in checkpoint["state"].items() if k in names})

    def publishable(self) -> Detector:
        if self.best.exists():
            self.model.load_state_dict(torch.load(self.best, map_location=self.device, weights_only=True)["model"])
        self.model.eval()
        return self.detector

    # ------------------------------------------------------------------------------------------------ stepping

    def start(self, step: int) -> None:
        spec, recipe = self.spec, self.spec.hp.recipe
        sampler = data.StepBatchSampler(len(spec.train_items), recipe.batch_size, recipe.seed, step, spec.total,
                                        self.rank, self.world)
        self.batches = iter(data.loader(self._dataset(spec.train_items, True), batch_sampler=sampler,
                                        workers=self.workers, pin_memory=self.device.type == "cuda"))
        self._train_mode()

    def prepare(self, step: int) -> dict[str, Any] | None:
        """A new stage of ``stage-N-epochs`` (or the one resumed in): only the heads and the last ``layers``
        backbone stages get gradients from now on."""
        layers = self.spec.hp.recipe.trainable_layers_at(step, len(self.spec.train_items))
        if layers is None or layers == self.stage:
            return None
        self.stage = layers
        for parameter in self.model.backbone.parameters():
            parameter.requires_grad_(True)
        self.frozen_norms = family_of(self.spec.arch).freeze_backbone(self.model, layers, self.spec.hp.recipe.init)
        self._train_mode()
        return {"trainable_backbone_layers": layers}

    def step(self, step: int) -> StepOutcome:
        """One optimizer step, as torchvision's ``train_one_epoch`` takes it."""
        waited = time.perf_counter()
        images, targets = next(self.batches)
        waited = time.perf_counter() - waited
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.scaler.is_enabled()):
            losses = self.trained(images, targets)
            loss = sum(losses.values())
        # one device sync per step for all the numbers logged (as the references' MetricLogger does)
        values = dict(zip(["loss", *losses], torch.stack([loss, *losses.values()]).detach().tolist(), strict=True))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.spec.hp.recipe.gradient_clip_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.hp.recipe.gradient_clip_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return StepOutcome(values, lr, waited)

    def _train_mode(self) -> None:
        self.trained.train()
        for module in self.frozen_norms:  # frozen statistics stay frozen
            module.eval()

    def agree(self, signalled: bool, state: TrainState) -> bool:
        if self.world == 1:
            return signalled
        codes = {None: 0, "early-stopping": 1, "time-limit": 2}
        flags = torch.tensor([int(signalled), codes[state.stopped]], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        state.stopped = {v: k for k, v in codes.items()}[int(flags[1])]
        return bool(flags[0])

    # ------------------------------------------------------------------------------------------------ validation

    def evaluate(self) -> dict[str, Any] | None:
        recalibrate_batch_norm(self.model, self.calibration, self.device, self.frozen_norms)
        try:
            if self.val_loader is None:
                return None
            if self.tags:
                return evaluate_tags(self.model, self.val_loader, self.spec.labels, self.device)
            return evaluate(self.model, self.val_loader, self.spec.labels, self.with_masks, self.device,
                            keypoints=KeypointLayout.of(self.spec.labels) if self.with_keypoints else None)
        finally:
            self._train_mode()

    def validated(self, score: float | None) -> None:
        optim.validated(self.scheduler, score)

    # ------------------------------------------------------------------------------------------------ checkpoints

    def save(self, state: TrainState) -> None:
        if self.main:
            _atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                          "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                          "rng": _rng_state(), "state": dataclasses.asdict(state), "total_steps": self.spec.total,
                          "samples_drawn": state.step * self.spec.hp.recipe.batch_size * self.world}, self.checkpoint)

    def save_best(self, state: TrainState) -> None:
        if self.main:
            _atomic_save({"model": self.model.state_dict(), "step": state.step, "metrics": state.best_metrics},
                         self.best)

    def close(self) -> None:
        self.batches = None  # the loader's worker processes end with their iterator

    # ------------------------------------------------------------------------------------------------ data

    def _dataset(self, items: Sequence[data.Item], train: bool) -> data.DetectionDataset:
        hp = self.spec.hp
        transform = data.transforms(hp, self.spec.arch.fixed_size, train, boxes=not self.tags,
                                    keypoints=self.with_keypoints)
        return data.DetectionDataset(items, self.spec.labels, transform, self.with_masks,
                                     hp.recipe.seed if train else 0, tags=self.tags, keypoints=self.with_keypoints)

    def _val_loader(self):
        return data.loader(self._dataset(self.spec.val_items, False), batch_size=self.spec.hp.recipe.batch_size,
                           workers=self.workers, pin_memory=self.device.type == "cuda")

    def _calibration_loader(self):
        """Training frames spread over the set, unaugmented; loaded in this process (a few dozen frames)."""
        items = sample(self.spec.train_items, CALIBRATION_FRAMES)
        batch = max(2, self.spec.hp.recipe.batch_size)  # full batches only: a batch norm cannot measure one 1x1 map
        items = (items * batch)[:math.ceil(len(items) / batch) * batch]  # every one, the last batch filled up
        return data.loader(self._dataset(items, False), batch_size=batch, workers=0)


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill never leaves half a checkpoint."""
    with replacing(path) as temporary:
        torch.save(obj, temporary)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

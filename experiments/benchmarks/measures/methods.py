"""Each gradient-trained method's training cost per image against CoOp's (`--methods`)."""

from __future__ import annotations

import statistics

import open_clip
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from experiments.benchmarks.measures.common import (
    BenchBase,
    StepTimer,
    method_names,
    quiet_trainer,
)
from src.methods.base import build_method
from src.models.text_encoder import TextEncoder


class Methods(BenchBase):
    """Each gradient-trained method's training cost per image against CoOp's (`--methods`)."""

    def methods(self) -> None:
        """Each method's training cost per image (ms) and its ratio to CoOp's, CoOp measured first."""
        args = self.args
        names = method_names(args)
        with quiet_trainer():
            for name in names:
                seconds = self.method_step_time(name)
                self.figures[f"method_{name}_step_s"] = seconds
                self.figures[f"method_{name}_ms_per_image"] = 1000 * seconds / args.methods_batch
        coop = self.figures["method_coop_ms_per_image"]
        for name in names:
            self.figures[f"method_{name}_vs_coop"] = self.figures[f"method_{name}_ms_per_image"] / coop
        self.figures.update(
            methods_backbone=args.methods_backbone,
            methods_batch=args.methods_batch,
            methods_steps=args.repeats,
        )

    def method_step_time(self, name: str) -> float:
        """Median seconds of a training step of `name` (`--methods`), built as src.train builds it and
        trained by a Lightning Trainer, after `--warmup` untimed steps."""
        args = self.args
        cfg = args.method_configs[name]
        clip = self.clip(args.methods_backbone)
        clip.text = TextEncoder(clip.model, path="auto")  # the run's default (other figures change it)
        classnames = open_clip.IMAGENET_CLASSNAMES[: args.classes]
        torch.manual_seed(0)
        module = build_method(cfg.method, clip, classnames)
        steps = args.warmup + args.repeats
        generator = torch.Generator().manual_seed(0)
        size = clip.image_size
        images = torch.randn(steps * args.methods_batch, 3, size, size, generator=generator)
        labels = torch.arange(len(images)) % len(classnames)
        loader = DataLoader(TensorDataset(images, labels), batch_size=args.methods_batch)
        timer = StepTimer(self.device)
        on_gpu = self.device.type == "cuda"
        trainer = pl.Trainer(
            max_epochs=1,
            limit_train_batches=steps,
            accelerator="gpu" if on_gpu else "cpu",
            devices=[self.device.index or 0] if on_gpu else 1,
            precision={"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(args.precision, "32-true"),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        trainer.fit(module, train_dataloaders=loader)
        self.method_runs[name] = cfg.method.name
        return statistics.median(timer.times[args.warmup :])

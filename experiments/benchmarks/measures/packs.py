"""Runs trained as one pack against one alone: step time per run, peak memory, activations."""

from __future__ import annotations

import open_clip
import torch

from experiments.benchmarks.measures.common import (
    GRID_PACK,
    GRID_SEEDS,
    GRID_VARIANTS,
    BenchBase,
    measure,
    saved_bytes,
)
from src.methods.base import total_loss
from src.methods.coop import CoOp
from src.models.text_encoder import TextEncoder
from src.packing.module import packed_loss_terms, stack_key


class Packs(BenchBase):
    """Runs trained as one pack against one alone: step time per run, peak memory, activations."""

    def packed_step_time(
        self, backbone: str, names: list[str], cached: bool, variants: list[tuple[bool, str]]
    ) -> tuple[float, int]:
        """Seconds and peak memory of one step of a pack of runs (src/packing/module.py's step), a run per
        (class_specific, position) of `variants`, each with its own context, images and optimiser."""
        clip = self.clip(backbone)
        clip.text = TextEncoder(clip.model, path="auto")
        size, batch = clip.image_size, self.args.batch
        generator = torch.Generator().manual_seed(1)
        modules, batches, optimizers = [], [], []
        for seed, (class_specific, position) in enumerate(variants):
            torch.manual_seed(seed)
            module = CoOp(clip, names, class_specific=class_specific, class_token_position=position)
            modules.append(module.to(self.device))
            images = torch.randn(batch, 3, size, size, generator=generator).to(self.device)
            if cached:
                with torch.no_grad(), self.autocast:
                    images = clip.encode_image(images)
            labels = torch.randint(len(names), (batch,), generator=generator).to(self.device)
            batches.append((images, labels))
            optimizers.append(torch.optim.SGD(module.prompt_learner.parameters(), lr=0.002, momentum=0.9))
        keys = [stack_key(module) for module in modules]

        def step() -> None:
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            with self.autocast:
                terms = packed_loss_terms(clip, modules, keys, batches)
            torch.stack([total_loss(run) for run in terms]).sum().backward()
            for optimizer in optimizers:
                optimizer.step()

        self.last_step = step
        return measure(step, self.device, self.args.repeats, self.args.warmup)

    def pack(self) -> None:
        """R runs as one pack against one alone: step time per run and peak memory."""
        args, runs = self.args, self.args.pack
        for classes in args.pack_classes:
            names = open_clip.IMAGENET_CLASSNAMES[:classes]
            for kind, cached in (("images", False), ("cached", True)):
                tag = f"pack{runs}_{kind}_{classes}"
                alone_s, alone_peak = self.step_time(args.backbone, names, "auto", cached)
                alone_saved = saved_bytes(self.last_step, self.clip(args.backbone))
                seeds = [(False, "end")] * runs
                packed_s, packed_peak = self.packed_step_time(args.backbone, names, cached, seeds)
                packed_saved = saved_bytes(self.last_step, self.clip(args.backbone))
                label = f"{kind} {classes} classes:"
                self.record(f"{tag}_alone", f"{label} one run alone", alone_s, alone_peak)
                self.record(f"{tag}_packed", f"{label} {runs} runs packed", packed_s, packed_peak)
                self.figures[f"{tag}_speedup"] = alone_s / (packed_s / runs)  # per-run step time
                self.figures[f"{tag}_saved_mb_alone"] = alone_saved / 2**20
                self.figures[f"{tag}_saved_mb_packed"] = packed_saved / 2**20
                # what the step keeps for backward, packed / alone: at most R when it grows linearly
                self.figures[f"{tag}_saved_ratio"] = packed_saved / max(alone_saved, 1)
                if self.device.type == "cuda":  # the allocator's peak; a CPU's resident set undercounts
                    self.figures[f"{tag}_peak_mem_ratio"] = packed_peak / alone_peak

    def pack_memory(self) -> None:
        """Activations one step of each grid variant keeps for backward (forward only: the pack of
        12 would hold them all at once), and the grid's pack of 12 from them."""
        args = self.args
        clip = self.clip(args.grid_backbone)
        clip.text = TextEncoder(clip.model, path="auto")
        names = open_clip.IMAGENET_CLASSNAMES[: args.pack_memory]
        width = clip.model.text_projection.shape[1]
        total = 0.0
        for class_specific, position in GRID_VARIANTS:
            torch.manual_seed(0)
            module = CoOp(clip, names, class_specific=class_specific, class_token_position=position)
            batch = [(torch.randn(args.batch, width), torch.arange(args.batch) % len(names))]

            def forward(module: CoOp = module, batch: list = batch) -> None:
                packed_loss_terms(clip, [module], [stack_key(module)], batch)

            megabytes = saved_bytes(forward, clip) / 2**20
            name = f"pack_memory_{'csc' if class_specific else 'unified'}_{position}_{args.pack_memory}_mb"
            self.figures[name] = megabytes
            self.rows.append((f"{name} (activations, fp32)", 0.0, int(megabytes * 2**20)))
            total += megabytes
        self.figures[f"pack_memory_grid{len(GRID_PACK)}_{args.pack_memory}_mb"] = GRID_SEEDS * total

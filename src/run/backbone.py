"""A run's frozen CLIP: built from the run's seed, described in its log, and handed to its data
module as the image encoder the data module computes (and caches) features with."""

from __future__ import annotations

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from src.data.datamodule import FewShotDataModule
from src.data.feature_cache import ImageEncoder
from src.models.clip import FrozenCLIP, weights_identity


def build_backbone(cfg: DictConfig, datamodule: FewShotDataModule, trainer: pl.Trainer) -> FrozenCLIP:
    """The run's frozen CLIP, built after seeding torch's global generator with the run's seed: the
    run's random stream starts here (CLIP's construction draws from it too, then the method's
    context, then the training's data order and augmentations). The data module gets its image
    encoder, run as `trainer` runs."""
    pl.seed_everything(cfg.seed, workers=True)
    clip = instantiate(cfg.model)
    datamodule.use_encoder(image_encoder(clip, trainer))
    return clip


def image_encoder(clip: FrozenCLIP, trainer: pl.Trainer) -> ImageEncoder:
    """`clip`'s image encoder as the data module runs it: on the trainer's device and process, under
    its precision."""
    strategy = trainer.strategy
    return ImageEncoder(
        encode=clip.encode_image,
        weights=weights_identity(clip),
        image_size=clip.image_size,
        precision=str(trainer.precision),
        forward_context=trainer.precision_plugin.forward_context,
        device=lambda: strategy.root_device,
        is_global_zero=lambda: trainer.is_global_zero,
        barrier=strategy.barrier,
    )


def describe_backbone(clip: FrozenCLIP) -> str:
    return f"{clip.name} ({clip.pretrained or 'random weights'})"


def describe_devices(trainer: pl.Trainer) -> str:
    """'cpu, precision 32-true', '4 cuda devices, precision bf16-mixed' (Lightning's own lines are
    in the run's log file)."""
    count = trainer.num_devices * trainer.num_nodes
    kind = trainer.strategy.root_device.type
    return f"{kind if count == 1 else f'{count} {kind} devices'}, precision {trainer.precision}"

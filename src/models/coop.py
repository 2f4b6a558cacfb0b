"""CoOp as a LightningModule: frozen CLIP plus a learnable prompt context."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy

from src.models.accuracy_test import AccuracyTest
from src.models.clip import FrozenCLIP
from src.models.prompt_learner import InitCount, Position, PromptLearner

PROMPT_FORMAT = 1
PROMPT_FILE = "prompt.pt"  # a finished run's prompt
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"  # Lightning's, holding the prompt as well
CHECKPOINT_PROMPT = "prompt"  # the key of the prompt in a Lightning checkpoint


class CoOp(AccuracyTest, pl.LightningModule):
    """Learns the prompt context from few labelled images; CLIP itself never changes."""

    # True where the prompts change the image features too (MaPLe): tested on images, never on
    # cached image features, and with no class text features of their own to ensemble.
    prompts_images: ClassVar[bool] = False

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        class_token_position: Position = "end",
        ctx_init_count: InitCount = "words",
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["clip"])
        self.clip = clip
        self.prompt_learner = self.make_prompt_learner(
            classnames,
            clip,
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            class_specific=class_specific,
            class_token_position=class_token_position,
            ctx_init_count=ctx_init_count,
        )
        # Lightning resume checkpoints hold the context only; CLIP comes from its own weights.
        self.strict_loading = False
        n_cls = len(classnames)
        self.val_acc = MulticlassAccuracy(num_classes=n_cls, average="micro")
        self.init_test_metrics(n_cls)
        self._eval_text_features: torch.Tensor | None = None

    # -- the method -------------------------------------------------------------------------
    def make_prompt_learner(self, classnames: list[str], clip: FrozenCLIP, **options: Any) -> PromptLearner:
        return PromptLearner(classnames, clip.token_embedding, clip.tokenize, **options)

    def text_features(self) -> torch.Tensor:
        learner = self.prompt_learner
        prompts = learner(self.clip.text.prompt_length(learner.max_eos))
        return self.clip.text(prompts, learner.eos, learner.shared_len)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        return self.clip.logit_scale * image_features @ text_features.t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images [b, 3, h, w] or of their image features [b, d] (the data
        module's batches when image features are cached)."""
        text = self._eval_text_features
        if text is None:
            text = self.text_features()
        features = self.clip.image_features(images)
        return self.logits(features, text)

    # -- Lightning hooks --------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def _start_eval(self) -> None:
        # The prompts do not change during evaluation: encode them once, not once per batch.
        with torch.no_grad():
            self._eval_text_features = self.text_features()

    def _end_eval(self) -> None:
        self._eval_text_features = None

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def on_validation_epoch_end(self) -> None:
        self._end_eval()

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def on_test_epoch_end(self) -> None:
        self._end_eval()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.val_acc(self(images), labels)
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=len(labels))

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            [p for p in self.parameters() if p.requires_grad],  # CLIP's are frozen
            lr=hp.lr,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
        )
        schedule = warmup_cosine(hp.lr, hp.warmup_lr, hp.warmup_epochs, self.trainer.max_epochs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "epoch"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("clip.")]:
            del state[key]
        # What prompt.pt holds, so that src.eval, src.predict and src.interpret take an unfinished
        # run's last.ckpt too. Its context is the state dict's tensor: torch.save writes it once.
        checkpoint[CHECKPOINT_PROMPT] = {**self.prompt_state(), "ctx": state["prompt_learner.ctx"]}

    # -- the learned prompt, as a small portable file ---------------------------------------
    def prompt_state(self) -> dict[str, Any]:
        learner = self.prompt_learner
        return {
            "format": PROMPT_FORMAT,
            "ctx": learner.ctx.detach().cpu().clone(),
            "classnames": list(learner.classnames),
            "backbone": self.clip.name,
            "pretrained": self.clip.pretrained,
            "n_ctx": learner.n_ctx,
            "class_specific": learner.class_specific,
            "class_token_position": learner.class_token_position,
            "ctx_init": self.hparams.ctx_init,
            # with "words", the phrase's fixed rest is part of the prompt: rebuilt from ctx_init
            "ctx_init_count": self.hparams.ctx_init_count,
        }


def load_prompt(path: str | Path) -> dict[str, Any]:
    """The prompt of a run (its folder, prompt.pt or checkpoints/last.ckpt), read without unpickling
    code."""
    fix = "give a training run's folder, its prompt.pt or its checkpoints/last.ckpt"
    file = prompt_file(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # torch raises many kinds for a file that is not plain tensors and data
        raise ValueError(
            f"{file} is not a prompt file of this project ({type(err).__name__}): {fix}"
        ) from err
    if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint
        if CHECKPOINT_PROMPT not in state:
            raise ValueError(
                f"{file} is a checkpoint without a prompt (of a method without one, or of an older "
                f"version of this project): {fix}"
            )
        state = state[CHECKPOINT_PROMPT]
    if not isinstance(state, dict) or state.get("format") != PROMPT_FORMAT:
        raise ValueError(f"{file} is not a prompt file of this project (format {PROMPT_FORMAT}): {fix}")
    return state


def prompt_file(path: str | Path) -> Path:
    """The file a prompt is read from: `path` itself, or in a run folder its prompt.pt (written at
    the end) or else its checkpoints/last.ckpt (the latest epoch of an unfinished run)."""
    path = Path(path)
    fix = f"give a training run's folder, its {PROMPT_FILE} or its {LAST_CHECKPOINT}"
    if path.is_dir():
        for file in (path / PROMPT_FILE, path / LAST_CHECKPOINT):
            if file.is_file():
                return file
        raise ValueError(f"ckpt={path}: this folder has no {PROMPT_FILE} or {LAST_CHECKPOINT}; {fix}")
    if not path.is_file():
        raise ValueError(f"ckpt={path}: no such file or folder; {fix}")
    return path


def run_folder(path: str | Path) -> Path:
    """The run folder of a prompt given as its folder, prompt.pt or checkpoints/last.ckpt: what is
    written "beside the prompt" goes there."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.parent.name == LAST_CHECKPOINT.parent.name and path.suffix == LAST_CHECKPOINT.suffix:
        return path.parent.parent
    return path.parent


def coop_from_prompt(
    state: dict[str, Any],
    clip: FrozenCLIP,
    classnames: list[str] | None = None,
    module_cls: type[CoOp] | None = None,
    **module_kwargs: Any,
) -> CoOp:
    """Rebuilds CoOp (or `module_cls`, a subclass, given `module_kwargs`) from a prompt file, for its
    own class list or, for a unified context, for another one (a class-specific context only exists
    for the classes it was trained on)."""
    if (clip.name, clip.pretrained) != (state["backbone"], state["pretrained"]):
        raise ValueError(
            f"the prompt was learned on {state['backbone']} ({state['pretrained']}), not "
            f"{clip.name} ({clip.pretrained}): use model.name={state['backbone']} "
            f"model.pretrained={state['pretrained']}"
        )
    classnames = list(classnames or state["classnames"])
    if state["class_specific"] and classnames != state["classnames"]:
        raise ValueError(
            "a class-specific context only applies to the class list it was trained on "
            f"({len(state['classnames'])} classes); evaluate it on that dataset or train a unified one"
        )
    module = (module_cls or CoOp)(
        clip,
        classnames,
        n_ctx=state["n_ctx"],
        ctx_init=state.get("ctx_init"),
        class_specific=state["class_specific"],
        class_token_position=state["class_token_position"],
        # files from before ctx_init_count learned every token of the phrase
        ctx_init_count=state.get("ctx_init_count", "tokens"),
        **module_kwargs,
    )
    if module.prompt_learner.ctx.shape != state["ctx"].shape:
        raise ValueError(
            f"context of shape {tuple(state['ctx'].shape)} does not fit the backbone's token "
            f"embedding (expected {tuple(module.prompt_learner.ctx.shape)})"
        )
    with torch.no_grad():
        module.prompt_learner.ctx.copy_(state["ctx"])
    return module


def warmup_cosine(lr: float, warmup_lr: float, warmup_epochs: int, max_epochs: int):
    """LR factor per epoch: constant `warmup_lr` for the warm-up epochs, then the cosine of the
    reference, lr * 0.5 * (1 + cos(pi * (e - warmup) / max_epochs)), stepped once per epoch."""
    if lr <= 0:
        raise ValueError(f"method.module.lr={lr}: the learning rate must be positive")

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return warmup_lr / lr
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / max_epochs))

    return factor

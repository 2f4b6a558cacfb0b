"""CoOp as a LightningModule: frozen CLIP plus a learnable prompt context."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from src.common.messages import override
from src.methods.base import (
    CHECKPOINT_PROMPT,
    LossTerms,
    Method,
    TextOncePerEvaluation,
    ValidatesAccuracy,
    check_backbone,
    constructor_hparams,
    plain,
)
from src.models.clip import Architecture, FrozenCLIP
from src.models.prompt_learner import InitCount, Position, PromptLearner, check_context

Features = tuple[Tensor, Tensor]  # a batch's image features [b, d] and class text features [n, d]
CTX = "prompt_learner.ctx"  # the context's state-dict name; prompt.pt holds it as `ctx`


class CoOp(TextOncePerEvaluation, ValidatesAccuracy, Method):
    """Learns the prompt context from few labelled images; CLIP itself never changes.

    A successor extends it (`class KgCoOp(CoOp)`): its own arguments, CoOp's forwarded
    (`**coop_args`), its own loss; its trained parameters are saved in prompt.pt and loaded back
    with its arguments by `from_prompt`, with no code of its own.
    """

    name = "coop"
    learns_context = True
    text_classifier = True

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        class_token_position: Position = "end",
        ctx_init_count: InitCount = "words",
    ) -> None:
        super().__init__(clip, classnames)
        self.save_hyperparameters(ignore=["clip"])
        self.prompt_learner = self.make_prompt_learner(
            classnames,
            clip,
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            class_specific=class_specific,
            class_token_position=class_token_position,
            ctx_init_count=ctx_init_count,
        )

    @classmethod
    def transfer_refusal(cls, options: dict[str, Any]) -> str | None:
        if options.get("class_specific", False):
            return "a class-specific context only applies to the class list it was trained on"
        return super().transfer_refusal(options)

    @classmethod
    def check_config(cls, args: dict[str, Any], architecture: Architecture) -> None:
        super().check_config(args, architecture)
        check_context(args["n_ctx"], args["ctx_init"], args["class_token_position"], args["ctx_init_count"])

    # -- the method -------------------------------------------------------------------------
    def make_prompt_learner(self, classnames: list[str], clip: FrozenCLIP, **options: Any) -> PromptLearner:
        return PromptLearner(classnames, clip.token_embedding, clip.tokenize, **options)

    def text_features(self) -> torch.Tensor:
        return self.clip.text(*self.text_inputs())

    def text_inputs(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """What the text encoder takes: the prompt embeddings [n_cls, length, width], their EOS
        positions and how many leading positions every class shares. Runs whose EOS positions and
        shared length are equal are encoded in one call (src/packing/module.py)."""
        learner = self.prompt_learner
        return learner(self.clip.text.prompt_length(learner.max_eos)), learner.eos, learner.shared_len

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        return self.clip.logit_scale * image_features @ text_features.t()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.image_features(images)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unnormalised image features of a batch [b, d] and class text features [n_cls, d] whose
        `logits` are the method's: what a method built on this one (DePT) adds its own head to."""
        text = self._eval_text_features
        if text is None:
            text = self.text_features()
        return self.image_features(images), text

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images [b, 3, h, w] or of their image features [b, d] (the data
        module's batches when image features are cached)."""
        return self.logits(*self.features(images))

    # -- training (the step is the contract's: it sums these terms) ---------------------------
    def loss_terms(self, images: Tensor, labels: Tensor, features: Features | None = None) -> LossTerms:
        """The loss terms of a batch: `ce`, the `loss` of its logits. A successor adds its own terms
        to these (KgCoOp's `kg`). `features`: the batch's image and class text features when they
        were computed already (`features(images)`: a pack computes them for all its runs at once,
        DePT for its head too)."""
        image, text = self.features(images) if features is None else features
        return {"ce": self.loss(self.logits(image, text), labels)}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch's logits: CoOp's cross-entropy."""
        return F.cross_entropy(logits, labels)

    # -- Lightning hooks --------------------------------------------------------------------

    # -- results and the learned prompt, as a small portable file ---------------------------
    def result_fields(self) -> dict[str, Any]:
        learner = self.prompt_learner
        ctx_init = self.hparams.ctx_init
        return {
            "ctx": "class_specific" if learner.class_specific else "unified",
            "n_ctx": learner.n_ctx,
            "ctx_init": ctx_init,
            "ctx_init_count": self.hparams.ctx_init_count if ctx_init else None,  # words: the reference's
            "class_token_position": learner.class_token_position,
        }

    def method_state(self) -> dict[str, Any]:
        learner = self.prompt_learner
        hparams = {k: v for k, v in self.hparams.items() if k != "classnames"}
        return {
            "ctx": learner.ctx.detach().cpu().clone(),
            "n_ctx": learner.n_ctx,
            "class_specific": learner.class_specific,
            "class_token_position": learner.class_token_position,
            "ctx_init": self.hparams.ctx_init,
            # with "words", the phrase's fixed rest is part of the prompt: rebuilt from ctx_init
            "ctx_init_count": self.hparams.ctx_init_count,
            "hparams": plain(hparams),  # the arguments that rebuild the class (a successor's too)
            "weights": self.trained_weights(exclude=(CTX,)),  # a successor's other trained tensors
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if CHECKPOINT_PROMPT in checkpoint:  # the context once: the state dict's tensor
            checkpoint[CHECKPOINT_PROMPT]["ctx"] = checkpoint["state_dict"][CTX]

    @classmethod
    def from_prompt(
        cls,
        state: dict[str, Any],
        clip: FrozenCLIP,
        classnames: list[str] | None = None,
        template: str | None = None,
    ) -> CoOp:
        """The method rebuilt from its prompt file, for its own class list or, with a unified
        context, for another one (a class-specific context only exists for the classes it was
        trained on)."""
        check_backbone(state, clip)
        classnames = list(classnames or state["classnames"])
        if state["class_specific"] and classnames != state["classnames"]:
            raise ValueError(
                "a class-specific context only applies to the class list it was trained on "
                f"({len(state['classnames'])} classes{_of_dataset(state.get('trained_on'))}); evaluate "
                "it on that dataset or train a unified one"
            )
        module = cls(
            clip,
            classnames,
            **{
                **constructor_hparams(cls, state.get("hparams", {})),
                "n_ctx": state["n_ctx"],
                "ctx_init": state.get("ctx_init"),
                "class_specific": state["class_specific"],
                "class_token_position": state["class_token_position"],
                # files from before ctx_init_count learned every token of the phrase
                "ctx_init_count": state.get("ctx_init_count", "tokens"),
            },
        )
        if module.prompt_learner.ctx.shape != state["ctx"].shape:
            raise ValueError(
                f"context of shape {tuple(state['ctx'].shape)} does not fit the backbone's token "
                f"embedding (expected {tuple(module.prompt_learner.ctx.shape)})"
            )
        with torch.no_grad():
            module.prompt_learner.ctx.copy_(state["ctx"])
        module.load_trained_weights(state.get("weights", {}), f"the prompt file of {state['method']}", (CTX,))
        module.name = state["method"]
        return module


def _of_dataset(trained_on: dict[str, str] | None) -> str:
    """' of oxford_pets, dataset.subsample=base': where a prompt was trained, when known."""
    if trained_on is None:
        return ""
    subsample = trained_on["subsample"]
    classes = "" if subsample == "all" else f", {override('dataset.subsample', subsample)}"
    return f" of {trained_on['dataset']}{classes}"

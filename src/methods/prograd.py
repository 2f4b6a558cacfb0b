"""ProGrad (Zhu et al., "Prompt-aligned Gradient for Prompt Tuning", ICCV 2023): CoOp whose
gradient never works against the zero-shot prediction."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.optim import Optimizer

from src.methods.base import MethodOptionError
from src.methods.coop import CoOp
from src.methods.zeroshot import HandMadeGuided
from src.models.clip import Architecture, FrozenCLIP
from src.models.prompt_learner import PromptLearner


def project_conflicting(grad: torch.Tensor, kl_grad: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """The reference's update direction: where the cross-entropy gradient `grad` conflicts with
    the KL gradient (negative dot product), `lambda_` times its component along the KL gradient is
    removed (lambda_ = 1: the projection onto the plane orthogonal to it); otherwise it is kept."""
    g, k = grad.flatten().float(), kl_grad.flatten().float()
    norm = torch.linalg.vector_norm(k)
    dot = torch.dot(g, k)
    if norm == 0 or dot >= 0:
        return grad
    unit = k / norm
    return (g - lambda_ * torch.dot(g, unit) * unit).view_as(grad).to(grad.dtype)


def template_words(template: str) -> str:
    """The words of a template before the class name, ProGrad's initial context: "a type of pet, a
    photo of a {}." -> "a type of pet, a photo of a"; "" when the name comes first ("{} texture.")."""
    return template.split("{}")[0].strip(" ,")


def word_count(words: str) -> int:
    """The context vectors a phrase starts, as the official `len(ctx_init.split(" "))` (0 for none)."""
    return len(words.split(" ")) if words else 0


class ProGrad(HandMadeGuided, CoOp):
    """Trains on the cross-entropy; before each optimiser step, the gradient of each learnable
    tensor is projected (`project_conflicting`) against the gradient of the distillation loss
    KL(zero-shot || CoOp) at temperature T (times T^2), the zero-shot prediction coming from the
    hand-made `template`.

    As the reference, with `init_from_template` the context (`n_ctx` vectors) starts as zeros
    followed by the template's words before the class name, one vector per word (split at spaces)
    taken from the phrase's leading tokens; where a word is several tokens (a comma is one of its
    own), the phrase's remaining tokens stay fixed text before the name: "a type of pet, a photo of
    a {}." is 8 words and 9 tokens, so "a type of pet , a photo of" start the last 8 vectors and
    "a" stays a word of every prompt. Nothing is drawn at random for it.
    """

    name = "prograd"

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        template: str,
        lambda_: float = 1.0,
        temperature: float = 1.0,
        init_from_template: bool = True,
        **coop_args: Any,
    ) -> None:
        super().__init__(clip, classnames, **coop_args)  # the context: make_prompt_learner
        self.template = template
        self.lambda_ = lambda_
        self.temperature = temperature
        self._kl_grads: list[torch.Tensor] | None = None

    @classmethod
    def check_config(cls, args: dict[str, Any], architecture: Architecture) -> None:
        super().check_config(args, architecture)
        words = template_words(args["template"]) if args["init_from_template"] else ""
        n_words = word_count(words)
        if args["ctx_init_count"] == "words" and n_words > args["n_ctx"]:
            raise MethodOptionError(
                f"ctx.n_ctx={args['n_ctx']} is shorter than the {n_words} words of the template's "
                f"{words!r} that start the context: raise ctx.n_ctx or set "
                "method.module.init_from_template=false"
            )

    @property
    def init_words(self) -> str | None:
        """The phrase the context started from (after its zeros), or None for a random start."""
        words = template_words(self.hparams.template) if self.hparams.init_from_template else ""
        return words or None

    def make_prompt_learner(self, classnames: list[str], clip: FrozenCLIP, **options: Any) -> PromptLearner:
        # called by CoOp's constructor, after save_hyperparameters: the template is in hparams
        if not self.init_words:
            return super().make_prompt_learner(classnames, clip, **options)
        options = {**options, "ctx_init": self.init_words, "zeros_before_init": True}
        return super().make_prompt_learner(classnames, clip, **options)

    def kl_loss(self, logits: torch.Tensor, zero_shot_logits: torch.Tensor) -> torch.Tensor:
        """KL(zero-shot || CoOp) at temperature T, times T^2 (the reference's loss minus the
        zero-shot entropy, a constant: the same gradient)."""
        t = self.temperature
        return (
            F.kl_div(
                F.log_softmax(logits.float() / t, dim=-1),
                F.log_softmax(zero_shot_logits.float() / t, dim=-1),
                reduction="batchmean",
                log_target=True,
            )
            * t
            * t
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        features = self.clip.image_features(images)
        logits = self.logits(features, self.text_features())
        with torch.no_grad():
            zero_shot = (
                self.clip.logit_scale * F.normalize(features.float(), dim=-1) @ self.hand_made_features().t()
            )
        ce = F.cross_entropy(logits, labels)
        kl = self.kl_loss(logits, zero_shot)
        # The KL gradient, scaled like the loss that Lightning backpropagates (fp16 loss scaling) so
        # that it does not underflow, and unscaled here; Lightning unscales the CE gradient itself.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer else None
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        params = [p for p in self.parameters() if p.requires_grad]
        grads = torch.autograd.grad(kl * scale, params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g / scale for p, g in zip(params, grads, strict=True)]
        # gradient accumulation: the KL gradients add up like the CE ones
        self._kl_grads = (
            grads if self._kl_grads is None else [a + b for a, b in zip(self._kl_grads, grads, strict=True)]
        )
        self.log("train/loss", ce, prog_bar=True, batch_size=len(labels))
        self.log("train/kl", kl, batch_size=len(labels))
        return ce

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        if self._kl_grads is None:
            return
        params = [p for p in self.parameters() if p.requires_grad]
        for param, kl_grad in zip(params, self._kl_grads, strict=True):
            if param.grad is None:
                continue
            # DDP averages the CE gradients over the processes; the KL ones must be too, or the
            # processes would project differently and their contexts drift apart.
            kl_grad = self.trainer.strategy.reduce(kl_grad, reduce_op="mean")
            param.grad = project_conflicting(param.grad, kl_grad, self.lambda_)
        self._kl_grads = None

    def result_fields(self) -> dict[str, Any]:
        return {
            **super().result_fields(),
            "prograd_lambda": self.lambda_,
            "temperature": self.temperature,
            "template": self.template,
            "ctx_init": self.init_words,  # the last vectors' words (zeros before them)
            "ctx_init_count": self.hparams.ctx_init_count if self.init_words else None,
        }

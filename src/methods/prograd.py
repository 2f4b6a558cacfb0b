"""ProGrad (Zhu et al., "Prompt-aligned Gradient for Prompt Tuning", ICCV 2023): CoOp whose
gradient never works against the zero-shot prediction."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.optim import Optimizer

from src.methods.coop import CoOp
from src.methods.zeroshot import HandMadeGuided
from src.models.clip import FrozenCLIP
from src.models.prompt_learner import token_count


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


class ProGrad(HandMadeGuided, CoOp):
    """Trains on the cross-entropy; before each optimiser step, the gradient of each learnable
    tensor is projected (`project_conflicting`) against the gradient of the distillation loss
    KL(zero-shot || CoOp) at temperature T (times T^2), the zero-shot prediction coming from the
    hand-made `template`.

    As the reference, the context (`n_ctx` vectors) starts as zeros followed by the template's
    words before the class name ("a photo of a {}." -> "a photo of a"), with `init_from_template`.
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
        super().__init__(clip, classnames, **coop_args)
        self.template = template
        self.lambda_ = lambda_
        self.temperature = temperature
        words = template.split("{}")[0].strip(" ,")
        self.init_words = words if init_from_template and words else None
        if self.init_words:
            self._init_context(self.init_words)
        self._kl_grads: list[torch.Tensor] | None = None

    def _init_context(self, words: str) -> None:
        n_words = token_count(self.clip.tokenize, words)
        if n_words > self.prompt_learner.n_ctx:
            raise ValueError(
                f"ctx.n_ctx={self.prompt_learner.n_ctx} is shorter than the template's words {words!r} "
                f"({n_words} tokens): raise ctx.n_ctx or set method.module.init_from_template=false"
            )
        with torch.no_grad():
            tokens = self.clip.tokenize([words]).to(self.clip.token_embedding.weight.device)
            embedding = self.clip.token_embedding(tokens)[0, 1 : 1 + n_words].float()
            ctx = self.prompt_learner.ctx
            ctx.zero_()
            ctx[..., ctx.shape[-2] - n_words :, :] = embedding

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
        }

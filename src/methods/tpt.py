"""Test-time prompt tuning (Shu et al., "Test-Time Prompt Tuning for Zero-Shot Generalization in
Vision-Language Models", NeurIPS 2022): for each test image, its prompt is tuned on the image's own
augmented views, without labels, then the image is classified."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from src.common.prompt_file import load_prompt
from src.methods.base import method_from_prompt
from src.methods.coop import CoOp
from src.methods.frozen_classifier import FrozenClassifier
from src.models.clip import FrozenCLIP


def confident_views(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the int(N * fraction) views [N, n_cls] whose predictions have the lowest entropy
    (the reference's count: 6 of 64 for 10 %), at least one (the reference's loss would be NaN)."""
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    return torch.argsort(entropy)[: max(1, int(len(logits) * fraction))]


def average_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the views' average predicted distribution (the marginal over the views)."""
    log_mean = torch.logsumexp(logits.log_softmax(-1), dim=0) - math.log(len(logits))
    return -(log_mean.exp() * log_mean).sum()


class TestTimePromptTuning(FrozenClassifier):
    """Each test batch item is [1 + N, 3, h, w]: the image (eval transform) and N augmented views
    (conf/method/tpt.yaml sets data.test_transform). Per image, from the starting prompt (hand-made
    words, or the context of a prompt.pt given as `ckpt`): keep the `selection` most confident
    views, take `steps` AdamW steps minimising the entropy of their average prediction w.r.t. the
    context, classify the image with the tuned prompt, and reset the prompt."""

    __test__ = False  # not a pytest class despite its name
    name = "tpt"
    zero_shot = True
    needs_images = True  # augmented views of each test image, never cached features

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        ckpt: str | None = None,
        selection: float = 0.1,
        steps: int = 1,
        lr: float = 5e-3,
    ) -> None:
        super().__init__(clip, classnames)
        if not 0 < selection <= 1:
            raise ValueError(f"method.module.selection={selection}: the fraction of views kept, in (0, 1]")
        if steps < 1:
            raise ValueError(f"method.module.steps={steps}: test-time tuning needs at least 1 step")
        if ckpt:
            prompt = method_from_prompt(load_prompt(ckpt), clip, classnames, ckpt)
            if not (isinstance(prompt, CoOp) and prompt.text_classifier):
                raise ValueError(
                    f"method.module.ckpt={ckpt}: a prompt of method {prompt.name!r}, whose prompts are "
                    "not a text context alone; test-time tuning starts from a CoOp-like context (coop, "
                    "kgcoop, ...)"
                )
        else:
            prompt = CoOp(clip, classnames, n_ctx=n_ctx, ctx_init=ctx_init)
        self.prompt_learner = prompt.prompt_learner
        self.register_buffer("start_ctx", self.prompt_learner.ctx.detach().clone(), persistent=False)
        self.ckpt = ckpt
        self.ctx_init = None if ckpt else ctx_init
        self.selection = selection
        self.steps = steps
        self.lr = lr
        self.views_per_image: int | None = None  # augmented views seen in the test

    def text_features(self) -> torch.Tensor:
        learner = self.prompt_learner
        prompts = learner(self.clip.text.prompt_length(learner.max_eos))
        return F.normalize(self.clip.text(prompts, learner.eos, learner.shared_len), dim=-1)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """With the starting prompt (no tuning): src.predict and cached features."""
        return self.clip.logit_scale * F.normalize(image_features, dim=-1) @ self.text_features().t()

    def tune_and_predict(self, views: torch.Tensor) -> torch.Tensor:
        """Logits [n_cls] of views[0] after tuning the prompt on views [1 + N, 3, h, w]."""
        with torch.inference_mode(False), torch.enable_grad():  # Lightning tests in inference mode
            views = views.clone()  # a tensor made in inference mode cannot enter autograd
            with torch.no_grad():
                self.prompt_learner.ctx.copy_(self.start_ctx)
                features = F.normalize(self.clip.encode_image(views), dim=-1)
            optimizer = torch.optim.AdamW([self.prompt_learner.ctx], lr=self.lr)
            selected = None
            for _ in range(self.steps):
                logits = self.clip.logit_scale * features @ self.text_features().t()
                if selected is None:  # chosen once, with the starting prompt, as the reference
                    selected = confident_views(logits.detach(), self.selection)
                loss = average_entropy(logits[selected])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                return (self.clip.logit_scale * features[0] @ self.text_features().t()).detach()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        views, labels = batch
        if views.ndim != 5:
            raise ValueError(
                "method=tpt needs the augmented views of each test image: keep conf/method/tpt.yaml's "
                "data.test_transform and data.cache_features=false"
            )
        self.views_per_image = views.shape[1] - 1
        logits = torch.stack([self.tune_and_predict(item) for item in views])
        self.test_acc(logits, labels)
        self.test_macro_acc(logits, labels)
        self.log("test/acc", self.test_acc, batch_size=len(labels))
        self.log("test/macro_acc", self.test_macro_acc, batch_size=len(labels))

    def result_fields(self) -> dict[str, Any]:
        learner = self.prompt_learner
        return {
            **super().result_fields(),
            "ctx": "class_specific" if learner.class_specific else "unified",
            "n_ctx": learner.n_ctx,
            "ctx_init": self.ctx_init,
            "class_token_position": learner.class_token_position,
            "tpt_ckpt": self.ckpt,
            "tpt_views": self.views_per_image,
            "tpt_selection": self.selection,
            "tpt_steps": self.steps,
            "tpt_lr": self.lr,
        }

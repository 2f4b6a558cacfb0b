"""One training step: a method's loss is its named terms, summed by the contract's step, which runs
alone, in a pack and under DePT; what a subclass overrides (`loss`, `loss_terms`) is honoured in all
three, and whether its runs pack is derived from what it overrides."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from src.methods.base import Method, total_loss
from src.methods.coop import CoOp
from src.methods.dept import DePT
from src.methods.kgcoop import KgCoOp
from src.methods.prograd import ProGrad
from src.methods.promptsrc import PromptSRC
from src.packing.module import packed_loss_terms, stack_key, step_refusal

CLASSNAMES = ["cat", "dog", "sports car"]
TEMPLATE = "a photo of a {}."


class SmoothedLoss:
    """Overrides `loss` (the loss of the logits) only: label smoothing."""

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=0.2)


class ExtraTerm:
    """Overrides `loss_terms`: adds a term of its own, on the class text features."""

    def loss_terms(self, images, labels, features=None) -> dict[str, torch.Tensor]:
        features = self.features(images) if features is None else features
        terms = super().loss_terms(images, labels, features)
        return {**terms, "norm": 0.01 * features[1].float().pow(2).mean()}


class SmoothedCoOp(SmoothedLoss, CoOp):
    pass


class ExtraCoOp(ExtraTerm, CoOp):
    pass


class SmoothedKgCoOp(SmoothedLoss, KgCoOp):
    pass


class ExtraKgCoOp(ExtraTerm, KgCoOp):
    pass


class SmoothedPromptSRC(SmoothedLoss, PromptSRC):
    pass


class ExtraPromptSRC(ExtraTerm, PromptSRC):
    pass


# each base method, its two overriding subclasses and its arguments on the tiny model
METHODS = {
    "coop": (CoOp, SmoothedCoOp, ExtraCoOp, {"n_ctx": 4}),
    "kgcoop": (KgCoOp, SmoothedKgCoOp, ExtraKgCoOp, {"template": TEMPLATE, "weight": 2.0}),
    "promptsrc": (
        PromptSRC,
        SmoothedPromptSRC,
        ExtraPromptSRC,
        {"prompt_depth_text": 2, "prompt_depth_vision": 2},
    ),
}


def built(cls: type[Method], clip, args: dict[str, Any]) -> Method:
    """The method with its context moved away from its start (the same for every class)."""
    torch.manual_seed(0)
    module = cls(clip, CLASSNAMES, **args)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    return module


def batch(clip, module: Method) -> tuple[torch.Tensor, torch.Tensor]:
    """Images for a method that needs them, else cached image features; and their labels."""
    torch.manual_seed(1)
    labels = torch.tensor([0, 1, 2, 0])
    if module.needs_images:
        return torch.randn(4, 3, clip.image_size, clip.image_size), labels
    return torch.randn(4, clip.model.visual.output_dim), labels


def as_floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(term) for name, term in terms.items()}


@pytest.mark.parametrize("name", list(METHODS))
def test_the_step_sums_the_terms_and_an_override_changes_every_path_alike(tiny_clip, name):
    base_cls, smoothed_cls, extra_cls, args = METHODS[name]
    base = built(base_cls, tiny_clip, args)
    x, labels = batch(tiny_clip, base)
    with torch.no_grad():
        plain = base.loss_terms(x, labels)
        assert float(base.training_step((x, labels), 0)) == pytest.approx(float(total_loss(plain)), abs=1e-6)
        for cls, changed in ((smoothed_cls, "ce"), (extra_cls, "norm")):
            module = built(cls, tiny_clip, args)
            alone = module.loss_terms(x, labels)
            # the override changes the training loss: a term of its own, or another `ce`
            assert changed in alone and float(alone[changed]) != pytest.approx(float(plain.get(changed, 0)))
            assert float(module.training_step((x, labels), 0)) == pytest.approx(
                float(total_loss(alone)), abs=1e-6
            )
            # under DePT: the base's terms, its `ce` weighted 1 - cat_weight, then DePT's `cat`
            dept = DePT(tiny_clip, CLASSNAMES, module, cat_weight=0.25)
            under = dept.loss_terms(x, labels)
            assert list(under) == [*alone, "cat"]
            expected = {**as_floats(alone), "ce": 0.75 * float(alone["ce"])}
            for term, value in expected.items():
                assert float(under[term]) == pytest.approx(value, abs=1e-6), term
            if step_refusal(cls) is None:  # packed: the same terms from the pack's shared passes
                (packed,) = packed_loss_terms(tiny_clip, [module], [stack_key(module)], [(x, labels)])
                assert list(packed) == list(alone)
                for term, value in as_floats(alone).items():
                    assert float(packed[term]) == pytest.approx(value, abs=1e-5), term


def test_packability_is_derived_from_what_a_method_overrides():
    # CoOp's model, with a loss of its own or terms of its own: packed (the pack calls both)
    for cls in (CoOp, KgCoOp, SmoothedCoOp, ExtraCoOp, SmoothedKgCoOp, ExtraKgCoOp):
        assert step_refusal(cls) is None, cls
    # its prompts change the image encoder: no image pass to share
    assert "no image pass to share" in step_refusal(PromptSRC)
    # a step of its own (a gradient projection): alone, by that alone
    assert step_refusal(ProGrad).startswith("overrides on_before_optimizer_step, training_step")

    class OwnFeatures(CoOp):  # what the pack computes for all runs at once
        def text_features(self) -> torch.Tensor:
            return 2 * super().text_features()

    assert step_refusal(OwnFeatures).startswith("overrides text_features, which a pack does not run")

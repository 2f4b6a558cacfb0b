"""KgCoOp's regulariser and ProGrad's projected gradient: their defining behaviour on the tiny model,
and each method as a run."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from src.methods.kgcoop import KgCoOp
from src.methods.prograd import ProGrad, project_conflicting
from src.run.training import train
from tests.conftest import make_cfg, with_sgd
from tests.test_coop_module import fit

NAMES = ["abyssinian", "american bulldog", "basset hound", "bengal"]


def test_kgcoop_regulariser_is_zero_at_the_hand_made_prompt_and_pulls_back_to_it(tiny_clip):
    module = KgCoOp(tiny_clip, NAMES, template="a photo of a {}.", ctx_init="a photo of a")
    # the learned prompt starts as the hand-made one: [SOS] a photo of a <name> . [EOS]
    assert module.knowledge_distance(module.text_features()).abs() < 1e-6
    torch.manual_seed(0)
    with torch.no_grad():
        module.prompt_learner.ctx.add_(0.5 * torch.randn_like(module.prompt_learner.ctx))
    away = module.knowledge_distance(module.text_features())
    assert away > 1e-3
    away.backward()
    with torch.no_grad():
        module.prompt_learner.ctx.sub_(
            0.1 * module.prompt_learner.ctx.grad / module.prompt_learner.ctx.grad.norm()
        )
    assert module.knowledge_distance(module.text_features()) < away
    # and it is 1 - cos = half the squared distance of the normalised features
    text = F.normalize(module.text_features(), dim=-1)
    half_squared = ((text - module.hand_made_features()) ** 2).sum(-1).mean() / 2
    torch.testing.assert_close(module.knowledge_distance(module.text_features()), half_squared)


def test_kgcoop_loss_adds_the_weighted_distance(tiny_clip):
    module = KgCoOp(tiny_clip, NAMES, template="a photo of a {}, a type of pet.", weight=8.0)
    features, labels = torch.randn(6, tiny_clip.model.visual.output_dim), torch.arange(6) % 4
    loss = module.training_step((features, labels), 0)
    text = module.text_features()
    expected = F.cross_entropy(module.logits(features, text), labels) + 8.0 * module.knowledge_distance(text)
    torch.testing.assert_close(loss, expected)


def test_projection_removes_the_conflicting_component():
    kl = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(project_conflicting(torch.tensor([-1.0, 2.0]), kl), torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(
        project_conflicting(torch.tensor([-1.0, 2.0]), kl, 0.5), torch.tensor([-0.5, 2.0])
    )
    agreeing = torch.tensor([1.0, 2.0])
    assert torch.equal(project_conflicting(agreeing, kl), agreeing)


def test_prograd_update_never_works_against_the_kl_gradient(tiny_clip, tmp_path):
    """One real optimiser step (SGD, no momentum or decay): the applied update has a non-negative dot
    product with the KL gradient, though the plain CE gradient conflicts with it."""
    torch.manual_seed(0)
    module = ProGrad(tiny_clip, NAMES, template="a photo of a {}.")
    with_sgd(module, lr=1.0, momentum=0.0, weight_decay=0.0, warmup_epochs=0)
    assert module.prompt_learner.n_ctx == 16
    ctx = module.prompt_learner.ctx
    assert torch.count_nonzero(ctx[:12]) == 0 and torch.count_nonzero(ctx[12:]) > 0  # zeros, then the words
    features = torch.randn(8, tiny_clip.model.visual.output_dim)
    with torch.no_grad():
        zero_shot = module.clip.logit_scale * F.normalize(features, dim=-1) @ module.hand_made_features().t()
    labels = (zero_shot.argmax(-1) + 1) % 4  # against the zero-shot prediction: the gradients conflict
    before = ctx.detach().clone()
    logits = module.logits(features, module.text_features())
    ce_grad = torch.autograd.grad(F.cross_entropy(logits, labels), ctx, retain_graph=True)[0]
    kl_grad = torch.autograd.grad(module.kl_loss(logits, zero_shot), ctx)[0]
    assert torch.dot(ce_grad.flatten(), kl_grad.flatten()) < 0

    fit(module, DataLoader(TensorDataset(features, labels), batch_size=8), tmp_path)
    update = before - module.prompt_learner.ctx.detach()  # lr * the applied gradient
    assert torch.dot(update.flatten(), kl_grad.flatten()) >= -1e-6 * update.norm() * kl_grad.norm()
    torch.testing.assert_close(update, project_conflicting(ce_grad, kl_grad), atol=1e-5, rtol=1e-4)


def test_kgcoop_and_prograd_runs_write_their_results(tiny_overrides, tmp_path):
    for method in ("kgcoop", "prograd"):
        out = tmp_path / method
        cfg = make_cfg(
            [
                "dataset=oxford_pets",
                "shots=2",
                f"method={method}",
                "trainer.max_epochs=1",
                *tiny_overrides,
            ],
            out,
        )
        results = train(cfg)
        assert json.loads((out / "results.json").read_text()) == results
        assert results["method"] == method and results["epochs"] == 1
        state = torch.load(out / "prompt.pt", weights_only=True)
        assert state["method"] == method
    assert results["prograd_lambda"] == 1.0 and results["n_ctx"] == 16

"""KgCoOp's regulariser and ProGrad's projected gradient: their defining behaviour on the tiny model,
and each method as a run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from src.methods.base import (
    MethodOptionError,
    build_method,
    check_options,
    method_arguments,
    method_from_prompt,
)
from src.methods.kgcoop import KgCoOp
from src.methods.prograd import ProGrad, project_conflicting
from src.models.clip import Architecture
from src.run.config import compose_config
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
    # ProGrad's own template for the pets, recorded in results.json and in the prompt file
    assert results["template"] == state["hparams"]["template"] == "a type of pet, a photo of a {}."
    assert results["ctx_init"] == "a type of pet, a photo of a" and results["ctx_init_count"] == "words"


def prograd_of(dataset: str, classnames: list[str], clip, *overrides: str) -> ProGrad:
    """ProGrad as `python -m src.train method=prograd dataset=<dataset>` builds it (no data read)."""
    cfg = compose_config("train", ["method=prograd", f"dataset={dataset}", "model=tiny", *overrides])
    return build_method(cfg.method, clip, classnames)


def words_embedding(clip, words: str, n: int) -> torch.Tensor:
    """The token embeddings of the first `n` tokens of `words`."""
    return clip.token_embedding(clip.tokenize([words]))[0, 1 : 1 + n].float()


def test_prograd_starts_from_the_official_template_of_its_dataset(tiny_clip, tmp_path):
    """The official CUSTOM_TEMPLATES drive the zero-shot teacher and the initial context: zeros, then
    one vector per word of the template before the name, from the phrase's leading tokens; the rest
    of the phrase stays text before the name. No random draw."""
    rng = torch.random.get_rng_state()
    pets = prograd_of("oxford_pets", NAMES, tiny_clip)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert pets.template == "a type of pet, a photo of a {}."
    # 8 words, 9 tokens ("pet" and "," are two): "a type of pet , a photo of" learned, "a" stays text
    ctx, learner = pets.prompt_learner.ctx.detach(), pets.prompt_learner
    assert ctx.shape[0] == 16 and torch.count_nonzero(ctx[:8]) == 0
    phrase = words_embedding(tiny_clip, "a type of pet, a photo of a", 8)
    torch.testing.assert_close(ctx[8:], phrase, rtol=0, atol=0)
    a_then_name = tiny_clip.token_embedding(tiny_clip.tokenize(["a abyssinian."]))[0, 1:3].float()
    torch.testing.assert_close(learner.token_suffix[0, :2], a_then_name, rtol=0, atol=0)
    # the teacher: zero-shot CLIP with that template
    prompts = tiny_clip.tokenize([pets.template.format(name) for name in NAMES])
    teacher = F.normalize(tiny_clip.encode_text(prompts), dim=-1)
    torch.testing.assert_close(pets.hand_made_features(), teacher.float())

    dtd = prograd_of("dtd", ["banded", "blotchy"], tiny_clip)
    assert dtd.template == "a texture of {}." and dtd.init_words == "a texture of"
    ctx = dtd.prompt_learner.ctx.detach()
    assert torch.count_nonzero(ctx[:13]) == 0
    torch.testing.assert_close(ctx[13:], words_embedding(tiny_clip, "a texture of", 3), rtol=0, atol=0)
    # a dataset ProGrad has no template for takes its own; an override takes precedence
    assert prograd_of("digits", NAMES, tiny_clip).template == "a photo of the number {}."
    assert prograd_of("dtd", NAMES, tiny_clip, "method.module.template='{} texture.'").init_words is None

    # the prompt file rebuilds the same prompts, the fixed "a" included
    with torch.no_grad():
        pets.prompt_learner.ctx.add_(torch.randn_like(pets.prompt_learner.ctx))
    rebuilt = method_from_prompt(pets.prompt_state(), tiny_clip)
    torch.testing.assert_close(rebuilt.text_features(), pets.text_features(), rtol=0, atol=0)


def test_prograd_refuses_a_context_shorter_than_the_templates_words(tiny_clip):
    args = method_arguments(ProGrad, {"template": "a type of pet, a photo of a {}.", "n_ctx": 4})
    with pytest.raises(MethodOptionError, match="ctx.n_ctx=4 is shorter than the 8 words"):
        check_options(ProGrad, args, Architecture.of(tiny_clip.name))
    check_options(ProGrad, {**args, "n_ctx": 8}, Architecture.of(tiny_clip.name))


def test_prograd_base_to_new_trains_the_official_scripts_epochs():
    """scripts/base2new_train_prograd.sh: rn50_ep100 (ImageNet: rn50_ep50), not the shots' 200."""

    def epochs(*overrides: str) -> int:
        return compose_config("train", ["model=tiny", *overrides]).trainer.max_epochs

    base = ["method=prograd", "dataset.subsample=base"]
    assert epochs(*base, "dataset=oxford_pets") == epochs(*base, "dataset=dtd", "shots=1") == 100
    assert epochs(*base, "dataset=imagenet") == 50
    assert epochs(*base, "dataset=oxford_pets", "trainer.max_epochs=7") == 7
    assert epochs("method=prograd", "dataset=oxford_pets") == 200  # few-shot: the shots' epochs
    assert epochs("method=coop", "dataset=oxford_pets", "dataset.subsample=base") == 200

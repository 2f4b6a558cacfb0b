"""DePT: its head leaves the new classes' logits as its base method's, fuses raw logits on the
trained classes, trains on the stated weighted loss with its own lr, and runs on each base."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from src.common.files import save_torch
from src.common.prompt_file import load_prompt
from src.methods.base import method_from_prompt
from src.methods.coop import CoOp
from src.methods.dept import DePT
from src.methods.kgcoop import KgCoOp
from src.methods.maple import MaPLe
from src.methods.prograd import ProGrad
from src.methods.promptsrc import PromptSRC, aggregate_name
from src.report import load_runs
from src.run.training import train
from tests.conftest import make_cfg, with_sgd

TRAINED = ["cat", "dog", "sports car"]
NEW = ["ship", "tree"]
TEMPLATE = "a photo of a {}."
# the base method as the configs name it, its class, and its arguments on the tiny model
BASES = {
    "coop": (CoOp, {"n_ctx": 4}),
    "kgcoop": (KgCoOp, {"template": TEMPLATE, "weight": 2.0}),
    "maple": (MaPLe, {"prompt_depth": 2}),
    "promptsrc": (PromptSRC, {"prompt_depth_text": 2, "prompt_depth_vision": 2}),
}
# the tiny model's 2 blocks, on the command line
TINY_DEPTH = {
    "maple": ["method.module.prompt_depth=2"],
    "promptsrc": ["method.module.prompt_depth_text=2", "method.module.prompt_depth_vision=2"],
}


def trained_dept(clip, base: str) -> DePT:
    """DePT on the trained classes, every trained tensor moved away from its start."""
    cls, args = BASES[base]
    torch.manual_seed(0)
    module = DePT(clip, TRAINED, f"{cls.__module__}.{cls.__name__}", **args)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    return module


def inputs(clip, module: DePT, n: int = 4) -> torch.Tensor:
    """Images for a method that prompts them, else (cached) image features."""
    torch.manual_seed(1)
    if module.needs_images:
        return torch.randn(n, 3, clip.image_size, clip.image_size)
    return torch.randn(n, clip.model.visual.output_dim)


@pytest.mark.parametrize("base", list(BASES))
def test_on_other_classes_the_logits_are_the_base_methods_alone(tiny_clip, tmp_path, base):
    module = trained_dept(tiny_clip, base)
    state = load_prompt(save_torch(tmp_path / "prompt.pt", module.prompt_state()))
    on_new = method_from_prompt(state, tiny_clip, NEW)
    assert isinstance(on_new, DePT) and on_new.result_fields()["cat_head"] is False
    # the base method rebuilt alone from its own prompt file, on the new classes
    alone = load_prompt(save_torch(tmp_path / "base.pt", module.base.prompt_state()))
    alone = method_from_prompt(alone, tiny_clip, NEW)
    assert type(alone) is BASES[base][0]
    x = inputs(tiny_clip, module)
    with torch.no_grad():
        assert torch.equal(on_new(x), alone(x))
        on_new.on_test_epoch_start()  # prompts encoded once per test, as src.eval runs it
        assert torch.equal(on_new(x), alone(x))


@pytest.mark.parametrize("base", list(BASES))
def test_on_the_trained_classes_raw_logits_are_fused(tiny_clip, tmp_path, base):
    module = trained_dept(tiny_clip, base)
    x = inputs(tiny_clip, module)
    with torch.no_grad():
        image = module.base.image_features(x)
        head = module.head
        adjusted = image * head.image_cwt.scale + head.image_cwt.shift
        cat = adjusted @ head.linear.weight.t() + head.linear.bias
        expected = 0.3 * module.base(x) + 0.7 * cat  # no softmax: the official code's fusion
        torch.testing.assert_close(module(x), expected)
        assert (module(x) - module.base(x)).abs().max() > 1e-3
        # a subset of the trained classes (ImageNet-A's of ImageNet's): the head's rows of those
        state = load_prompt(save_torch(tmp_path / "prompt.pt", module.prompt_state()))
        subset = method_from_prompt(state, tiny_clip, ["sports car", "cat"])
        assert subset.result_fields()["cat_head"] is True
        torch.testing.assert_close(subset(x), expected[:, [2, 0]])


def test_loss_is_the_weighted_sum_plus_the_base_regulariser(tiny_clip):
    module = trained_dept(tiny_clip, "kgcoop")
    x, labels = inputs(tiny_clip, module), torch.tensor([0, 1, 2, 0])
    loss = module.training_step((x, labels), 0)
    base, head = module.base, module.head
    text = base.text_features()
    itm = F.cross_entropy(base.logits(x, text), labels)
    # each image's class text feature is a training sample of the head too, before the images
    samples = torch.cat(
        [
            text[labels] * head.text_cwt.scale + head.text_cwt.shift,
            x * head.image_cwt.scale + head.image_cwt.shift,
        ]
    )
    cat = F.cross_entropy(head.linear(samples), torch.cat([labels, labels]))
    knowledge = 2.0 * base.knowledge_distance(text)  # KgCoOp's, not scaled by 1 - lambda
    assert knowledge > 1e-4
    torch.testing.assert_close(loss, 0.3 * itm + 0.7 * cat + knowledge)
    loss.backward()  # the head's loss trains the prompt too (nothing detached)
    assert head.text_cwt.scale.grad.abs().sum() > 0 and base.prompt_learner.ctx.grad.abs().sum() > 0


def test_optimiser_is_the_bases_with_the_head_at_its_lr_ratio(tiny_clip):
    module = with_sgd(trained_dept(tiny_clip, "coop"))
    module.trainer = pl.Trainer(max_epochs=10, logger=False, enable_checkpointing=False)
    assert module.base.trainer is module.trainer  # Lightning hands it to the base too
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    base_group, head_group = optimizer.param_groups
    assert base_group["params"] == [module.base.prompt_learner.ctx]
    assert head_group["params"] == list(module.head.parameters())
    assert (base_group["initial_lr"], head_group["initial_lr"]) == (0.002, 0.002 * 6.5)
    assert base_group["weight_decay"] == head_group["weight_decay"] == 5e-4  # the scale too
    # the warm-up epoch at 1e-5 for both groups (as Dassl's constant warm-up), then each its cosine
    assert base_group["lr"] == pytest.approx(1e-5) and head_group["lr"] == pytest.approx(1e-5)
    schedule.step()
    assert (base_group["lr"], head_group["lr"]) == pytest.approx((0.002, 0.013))
    schedule.step()
    cosine = 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 10))).item()
    assert head_group["lr"] == pytest.approx(0.013 * cosine)


def test_prompt_file_round_trip(tiny_clip, tmp_path):
    module = trained_dept(tiny_clip, "maple")
    module.name = "maple_dept"
    state = load_prompt(save_torch(tmp_path / "prompt.pt", module.prompt_state()))
    assert state["class"] == "src.methods.dept.DePT" and state["method"] == "maple_dept"
    assert torch.equal(state["ctx"], module.base.prompt_learner.ctx)  # where src.interpret reads it
    rebuilt = method_from_prompt(state, tiny_clip)
    assert isinstance(rebuilt.base, MaPLe) and rebuilt.name == "maple_dept" and rebuilt.base.name == "maple"
    assert rebuilt.base.hparams == module.base.hparams
    trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trained.keys() == {n for n, p in rebuilt.named_parameters() if p.requires_grad}
    for name, param in rebuilt.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, trained[name]), name
    x = inputs(tiny_clip, module)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), module(x))


def test_bases_that_would_not_train_as_alone_are_refused(tiny_clip):
    with pytest.raises(ValueError, match=r"base=src.methods.cocoop.CoCoOp: .* a forward of its own"):
        DePT.create(tiny_clip, TRAINED, base="src.methods.cocoop.CoCoOp")
    with pytest.raises(ValueError, match="base=src.methods.prograd.ProGrad: .* a training step of its own"):
        DePT.create(tiny_clip, TRAINED, base=ProGrad(tiny_clip, TRAINED, template=TEMPLATE))

    class PerBatch(CoOp):  # a hook DePT does not run for its base (it runs the epoch hooks)
        def on_train_batch_end(self, *args) -> None:
            pass

    with pytest.raises(ValueError, match=r"Lightning hooks of its own \(on_train_batch_end\)"):
        DePT.create(tiny_clip, TRAINED, base=PerBatch(tiny_clip, TRAINED))
    with pytest.raises(ValueError, match="not a CoOp-family method"):
        DePT.create(tiny_clip, TRAINED, base="src.methods.zeroshot.ZeroShotCLIP", templates=[TEMPLATE])
    with pytest.raises(ValueError, match="cat_lr_ratio=0: use a weight in"):
        DePT.create(tiny_clip, TRAINED, base="src.methods.coop.CoOp", cat_lr_ratio=0)


def test_each_base_composes_trains_and_reports_under_its_name(tiny_overrides, tmp_path):
    recipes = {}
    for base in BASES:
        args = ["dataset=oxford_pets", "method=dept", f"method/base={base}", "shots=1", *tiny_overrides]
        cfg = make_cfg([*args, "dataset.subsample=base", *TINY_DEPTH.get(base, [])], tmp_path / base)
        recipes[base] = (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.method.optimizer.lr)
        cfg.trainer.max_epochs = 2
        results = train(cfg)
        assert results["method"] == f"{base}_dept" and results["base_method"] == base
        assert results["cat_head"] is True and results["method_class"] == "src.methods.dept.DePT"
        checkpoint = torch.load(tmp_path / base / "checkpoints" / "last.ckpt", weights_only=True)
        assert not [k for k in checkpoint["state_dict"] if "clip." in k]  # CLIP comes from its weights
        cls = BASES[base][0]
        assert load_prompt(tmp_path / base)["dept"]["base_class"] == f"{cls.__module__}.{cls.__name__}"
    # the official recipe of each pair: 10 epochs, batch 4, lr 0.0035 (KgCoOp: its weight 2.0);
    # PromptSRC, which the official code does not pair: its own (20 epochs, batch 4, lr 0.0025)
    assert recipes.pop("promptsrc") == (20, 4, 0.0025)
    assert set(recipes.values()) == {(10, 4, 0.0035)}
    # PromptSRC's prompts under DePT are its Gaussian aggregate over the epochs, as alone
    checkpoint = torch.load(tmp_path / "promptsrc" / "checkpoints" / "last.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    ctx = state["base.prompt_learner.ctx"]
    assert torch.equal(ctx, state["base." + aggregate_name("prompt_learner.ctx")]) and ctx.abs().sum() > 0
    kgcoop = make_cfg(["dataset=oxford_pets", "method=dept", "method/base=kgcoop"], tmp_path)
    assert kgcoop.method.module.weight == 2.0
    variants = set(load_runs(tmp_path)["variant"])
    assert variants == {
        "coop_dept unified end M16",
        "kgcoop_dept unified end M4 init='a photo of a'",
        "maple_dept unified end M2 init='a photo of a'",
        "promptsrc_dept unified end M4 init='a photo of a'",
    }


def test_with_cat_weight_0_the_run_is_the_base_methods_with_the_same_recipe(tiny_overrides, tmp_path):
    """The official baselines are re-runs with DePT's recipe: cat_weight=0 is that run, exactly."""
    args = ["dataset=oxford_pets", "shots=2", "trainer.max_epochs=2", *tiny_overrides]
    dept = train(make_cfg([*args, "method=dept", "method.module.cat_weight=0"], tmp_path / "dept"))
    recipe = ["data.batch_size=4", "trainer.max_epochs=2", "method.optimizer.lr=0.0035"]
    coop = train(make_cfg([*args, "method=coop", *recipe], tmp_path / "coop"))
    assert dept["test_acc"] == coop["test_acc"]
    contexts = [load_prompt(tmp_path / run)["ctx"] for run in ("dept", "coop")]
    assert torch.equal(*contexts)

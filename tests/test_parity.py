"""Parity with the official implementations: each method here computes what the official code
computes, on the same weights, class names, template and batch.

tests/fixtures/parity/<method>.pt were written by experiments/parity/<method>.py, which runs the
official repository's own model, loss and optimiser (unchanged but for the CPU and the weights) on
the tiny CLIP of `tiny_clip`. Each test builds the project's method from its config, gives it the
fixture's initial parameters and compares the logits (within 1e-5 + 1e-6 of each), every loss
term (1e-5), the gradients of the learned parameters (1e-4 of their largest magnitude), the
optimiser's settings and the learning rate of every epoch or step (to double rounding).
docs/methods.md tables the measured differences; experiments/parity/README.md regenerates the
fixtures.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import open_clip
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from experiments.parity.common import TINY, WIDE, project_clip, seeded, sketch, weights_digest
from src.methods.base import Method, build_method, total_loss
from src.models.clip import FrozenCLIP
from tests.conftest import make_cfg

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
LOGITS_ATOL = LOSS_ATOL = 1e-5
LOGITS_RTOL = 1e-6
GRAD_RTOL = 1e-4  # of the gradient's largest magnitude
LR_RTOL = 1e-12  # Dassl steps torch's cosine recursively, the project computes it in closed form


def load(name: str, clip: FrozenCLIP, digest: str | None = None) -> dict[str, Any]:
    """The fixture of `name`, once its weights are known to be `clip`'s (or to have `digest`)."""
    fixture = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    assert fixture["weights_digest"] == (digest or weights_digest(clip)), (
        f"{name}.pt was made on other CLIP weights than tiny_clip's (another open_clip or torch "
        "initialises otherwise): regenerate it (experiments/parity/README.md)"
    )
    return fixture


def project_method(
    name: str,
    clip: FrozenCLIP,
    classnames: list[str],
    tmp_path: Path,
    overrides: tuple[str, ...] = (),
    dataset: str = "oxford_pets",
) -> tuple[Method, Any]:
    """The project's method `name` as a run of `method=<name> dataset=<dataset>` builds it, and its
    config: the one place the tests build a method (its recipe is read from its config)."""
    cfg = make_cfg([f"method={name}", f"dataset={dataset}", "model=tiny", *overrides], tmp_path)
    return build_method(cfg.method, clip, classnames), cfg


def images_of(fixture: dict[str, Any]) -> torch.Tensor:
    """The fixture's pixels as CLIP's input (experiments/parity/common.py, `normalise`)."""
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (fixture["pixels"].float() / 255 - mean) / std


def set_initial(method: Method, fixture: dict[str, Any]) -> dict[str, torch.nn.Parameter]:
    """The method's learned parameters set to the fixture's initial ones (stored, or `seeded` for a
    large one); those returned."""
    params = dict(method.named_parameters())
    seeds = fixture.get("seeded_init", {})
    initial = fixture["init"] | {name: seeded(params[name].shape, seed) for name, seed in seeds.items()}
    learned = {name: params[name] for name in initial}
    with torch.no_grad():
        for name, value in initial.items():
            assert learned[name].shape == value.shape, name
            learned[name].copy_(value)
    return learned


def stored_grads(learned: dict[str, torch.nn.Parameter], fixture: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The learned parameters' gradients as the fixture stores them (a large one's as a sketch)."""
    seeds = fixture.get("seeded_init", {})
    return {n: sketch(p.grad, seeds[n]) if n in seeds else p.grad for n, p in learned.items()}


Differences = dict[str, float]  # the largest difference of each compared quantity


def max_diff(project: torch.Tensor, official: torch.Tensor) -> float:
    assert project.shape == official.shape, (project.shape, official.shape)
    return (project.detach().float() - official.float()).abs().max().item()


def compare_logits(project: torch.Tensor, official: torch.Tensor, name: str = "logits") -> Differences:
    """Within LOGITS_ATOL, plus LOGITS_RTOL of each logit: at CLIP-LoRA's fixed scale 100 (logits
    near 10), fp32's rounding of the cosines alone (1e-7) moves logits by 1e-5."""
    diff = max_diff(project, official)
    excess = ((project.detach() - official).abs() - LOGITS_RTOL * official.abs()).max().item()
    assert excess <= LOGITS_ATOL, f"{name} differ by {diff:.2e}"
    return {name: diff}


def compare_terms(project: dict[str, torch.Tensor], official: dict[str, torch.Tensor]) -> Differences:
    assert project.keys() == official.keys()
    diffs = {f"loss {name}": max_diff(project[name], value) for name, value in official.items()}
    for name, diff in diffs.items():
        assert diff <= LOSS_ATOL, f"{name} differs by {diff:.2e}"
    return diffs


def compare_grads(
    project: dict[str, torch.Tensor], official: dict[str, torch.Tensor], label: str = "grads"
) -> Differences:
    """Each gradient relative to the official one's largest magnitude; the largest of them."""
    assert project.keys() == official.keys()
    diffs = []
    for name, value in official.items():
        scale = value.abs().max().item()
        assert scale > 0, f"{name}: the official gradient is zero"
        diffs.append(diff := max_diff(project[name], value) / scale)
        assert diff <= GRAD_RTOL, f"the gradient of {name} differs by {diff:.2e} of its largest magnitude"
    return {label: max(diffs)}


def compare_schedule(method: Method, cfg: Any, fixture: dict[str, Any]) -> Differences:
    """The optimiser of the method's configure_optimizers, its settings and its learning rate in
    each epoch or step (stepped as Lightning steps it) against the official ones; the recipe's batch
    size and epochs (or steps) too."""
    recipe = fixture["recipe"]
    assert cfg.data.batch_size == recipe["batch_size"]
    if "epochs" in recipe:
        assert cfg.trainer.max_epochs == recipe["epochs"]
    else:  # counted in steps
        assert cfg.trainer.max_steps == recipe["steps"]
    steps = recipe.get("steps")  # a schedule per step: over as many steps as the official run's
    method.trainer = pl.Trainer(
        max_epochs=-1 if steps else cfg.trainer.max_epochs,
        max_steps=steps or -1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    config = method.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    settings = fixture["optimizer"]
    assert type(optimizer).__name__ == settings["type"]
    assert len(optimizer.param_groups) == len(settings["groups"])
    for group, official in zip(optimizer.param_groups, settings["groups"], strict=True):
        for key, value in official.items():
            assert group[key] == (tuple(value) if isinstance(value, list) else value), key
    lrs = []
    with warnings.catch_warnings():  # stepped without training: no optimiser step before it
        warnings.simplefilter("ignore", UserWarning)
        for _ in fixture["lr"]:
            lrs.append([group["lr"] for group in optimizer.param_groups])
            scheduler.step()
    assert len(lrs) == len(fixture["lr"])
    for epoch, (project, official) in enumerate(zip(lrs, fixture["lr"], strict=True)):
        assert project == pytest.approx(official, rel=LR_RTOL, abs=0), f"epoch {epoch}"
    pairs = [(p, o) for ps, os in zip(lrs, fixture["lr"], strict=True) for p, o in zip(ps, os, strict=True)]
    diff = max(abs(p - o) / o for p, o in pairs)
    return {"lr": diff}


def standard_parity(
    name: str, clip: FrozenCLIP, tmp_path: Path, overrides: tuple[str, ...] = (), digest: str | None = None
) -> tuple[Differences, Method]:
    """The checks of a method trained by the sum of its `loss_terms`: the deterministic initial
    parameters equal the official ones, then, from the fixture's, logits, terms, gradients and
    schedule; their largest differences, and the method (`digest`: of the weights the fixture was
    made with, where `clip` is a copy changed for the official setting)."""
    fixture = load(name, clip, digest)
    method, cfg = project_method(name, clip, fixture["classnames"], tmp_path, overrides)
    params = dict(method.named_parameters())
    for param in fixture.get("same_init", []):
        torch.testing.assert_close(params[param].detach(), fixture["init"][param], atol=0, rtol=0, msg=param)
    learned = set_initial(method, fixture)
    assert learned.keys() == {n for n, p in method.named_parameters() if p.requires_grad}
    images, labels = images_of(fixture), fixture["labels"]
    method.train()
    with torch.no_grad():
        diffs = compare_logits(method(images), fixture["logits"])
    terms = method.loss_terms(images, labels)
    diffs |= compare_terms(terms, fixture["loss"])
    total_loss(terms).backward()
    diffs |= compare_grads(stored_grads(learned, fixture), fixture["grads"])
    return diffs | compare_schedule(method, cfg, fixture), method


def kgcoop(clip: FrozenCLIP, tmp_path: Path) -> Differences:
    """htyao89/KgCoOp: CE + 8 x (1 - mean cos to the hand-made prompt's features), 4 words."""
    return standard_parity("kgcoop", clip, tmp_path)[0]


def maple(clip: FrozenCLIP, tmp_path: Path) -> Differences:
    """muzairkhattak/multimodal-prompt-learning: 2 tokens from "a photo", prompts in the 3 blocks
    of each tower of coop-tiny-b16 (the recipe's 9 need 9 blocks), couplings Linear(512, 768)."""
    return standard_parity("maple", clip, tmp_path, ("method.module.prompt_depth=3",))[0]


DEPTH_2 = ("method.module.prompt_depth_text=2", "method.module.prompt_depth_vision=2")


def ivlp(clip: FrozenCLIP, tmp_path: Path) -> Differences:
    """muzairkhattak/PromptSRC's IVLP: 4 text tokens from "a photo of a", 4 image tokens, prompts
    in both blocks of each tower of coop-tiny (the recipe's 9 need 9 blocks)."""
    return standard_parity("ivlp", clip, tmp_path, DEPTH_2)[0]


def promptsrc(clip: FrozenCLIP, tmp_path: Path) -> Differences:
    """muzairkhattak/PromptSRC: IVLP's prompts (as `ivlp`) plus the self-consistency terms against
    the frozen CLIP, and GPA's weight of each of the 20 epochs (mean 15, std 1)."""
    from src.methods.promptsrc import gpa_weights

    diffs, method = standard_parity("promptsrc", clip, tmp_path, DEPTH_2)
    fixture = load("promptsrc", clip)
    weights = gpa_weights(method.hparams.gpa_mean, method.hparams.gpa_std, len(fixture["lr"]))
    diff = (weights - fixture["gpa_weights"]).abs().max().item()
    assert diff <= 1e-12, f"GPA's weights differ by {diff:.1e}"
    return diffs | {"gpa weights": diff}


def prograd(clip: FrozenCLIP, tmp_path: Path) -> Differences:
    """BeierZhu/Prompt-align: CoOp (16 vectors: zeros, then "a photo of a") whose CE gradient loses
    its component along the KL gradient where they conflict. On Caltech101, whose official
    template is the project's. The project's KL(zero-shot || CoOp) is the official cross-entropy to
    the zero-shot prediction minus that prediction's entropy (the same gradient): compared with the
    entropy added back."""
    fixture = load("prograd", clip)
    method, cfg = project_method("prograd", clip, fixture["classnames"], tmp_path, dataset="caltech101")
    assert method.template == fixture["template"]
    ctx = method.prompt_learner.ctx
    torch.testing.assert_close(ctx.detach(), fixture["init"]["prompt_learner.ctx"], atol=0, rtol=0)
    set_initial(method, fixture)
    images, labels = images_of(fixture), fixture["labels"]
    method.train()
    with torch.no_grad():
        diffs = compare_logits(method(images), fixture["logits"])
        features = F.normalize(method.clip.image_features(images), dim=-1)
        zero_shot = method.clip.logit_scale * features @ method.hand_made_features().t()
    diffs |= compare_logits(zero_shot, fixture["zero_shot_logits"], "zero-shot logits")
    # the project's own step, as Lightning runs it: training_step, backward, on_before_optimizer_step
    logged = {}
    method.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    method.trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    optimizer = method.configure_optimizers()["optimizer"]
    method.training_step((images, labels), 0).backward()
    entropy = -(zero_shot.softmax(-1) * zero_shot.log_softmax(-1)).sum(-1).mean()
    terms = {"ce": logged["train/loss"], "kl": logged["train/kl"] + entropy}
    diffs |= compare_terms(terms, fixture["loss"])
    (kl_grad,) = method._kl_grads
    diffs |= compare_grads({"ctx": ctx.grad.clone()}, {"ctx": fixture["ce_grad"]}, "CE grad")
    diffs |= compare_grads({"ctx": kl_grad}, {"ctx": fixture["kl_grad"]}, "KL grad")
    method.on_before_optimizer_step(optimizer)
    diffs |= compare_grads({"prompt_learner.ctx": ctx.grad}, fixture["grads"], "projected grad")
    # Oxford Pets and DTD: the official template of each, from conf/method/prograd.yaml, starts the
    # context (exactly) and the class prompts (their text features) as the official prompt learner
    for dataset, official in fixture["template_inits"].items():
        start, _ = project_method("prograd", clip, fixture["classnames"], tmp_path, dataset=dataset)
        assert start.template == official["template"], dataset
        torch.testing.assert_close(start.prompt_learner.ctx.detach(), official["ctx"], atol=0, rtol=0)
        with torch.no_grad():
            features = start.text_features()
        diffs |= compare_logits(features, official["text_features"], f"{dataset} initial text features")
    return diffs | compare_schedule(method, cfg, fixture)


def clip_lora(clip: FrozenCLIP, tmp_path: Path) -> Differences:
    """MaxZanella/CLIP-LoRA: rank-2 adapters on q, k, v of both towers, "a photo of a {}.", logits
    100 x cos, AdamW with a cosine per step over 500 x shots iterations (1 shot: 500). Dropout
    1e-12 on both sides (the dropout path, masks keeping every input: random masks cannot be drawn
    alike); the B matrices start from the fixture's non-zero values."""
    overrides = ("shots=1", f"method.module.dropout={load('clip_lora', clip)['dropout']}")
    return standard_parity("clip_lora", clip, tmp_path, overrides)[0]


def dept(clip: FrozenCLIP, tmp_path: Path) -> Differences:
    """Koorye/DePT on CoOp: 16 random context vectors plus the CAT head, trained on 0.3 x CE + 0.7 x
    the head's CE, fused logits on the trained classes, the head at 6.5 x the lr."""
    return standard_parity("dept", clip, tmp_path)[0]


def tpt(clip: FrozenCLIP, tmp_path: Path) -> Differences:
    """azshue/TPT: 4 tokens from "a photo of a"; on one test image and 63 views: the views' logits,
    the 6 most confident views, the entropy of their mean prediction and its gradient, then the
    project's own `tune_and_predict` (its AdamW step) against the official tuned context and the
    image's logits after tuning."""
    from experiments.parity.tpt import views
    from src.methods.tpt import average_entropy, confident_views

    fixture = load("tpt", clip)
    method, _ = project_method("tpt", clip, fixture["classnames"], tmp_path)
    ctx = method.prompt_learner.ctx
    torch.testing.assert_close(ctx.detach(), fixture["init"]["prompt_learner.ctx"], atol=0, rtol=0)
    assert fixture["optimizer"]["type"] == "AdamW" and fixture["lr"] == [[method.lr]]
    images = images_of({"pixels": views(fixture["pixels"])})
    with torch.no_grad():
        features = F.normalize(clip.encode_image(images), dim=-1)
    logits = clip.logit_scale * features @ method.text_features().t()  # tune_and_predict's first step
    diffs = compare_logits(logits, fixture["view_logits"], "view logits")
    selected = confident_views(logits.detach(), method.selection)
    assert torch.equal(selected, fixture["selected"])
    loss = average_entropy(logits[selected])
    diffs |= compare_terms({"entropy": loss}, fixture["loss"])
    loss.backward()
    diffs |= compare_grads({"prompt_learner.ctx": ctx.grad}, fixture["grads"])
    tuned = method.tune_and_predict(images)
    diffs |= compare_logits(tuned[None], fixture["logits"])
    diff = max_diff(ctx, fixture["tuned_ctx"])
    assert diff <= 1e-6, f"the tuned context differs by {diff:.2e}"
    return diffs | {"tuned context": diff}


class CacheData:
    """What Tip-Adapter reads of its data module (`trainer.datamodule`): the cache images' labels,
    the features of their augmented views (view-major) and of the validation images; here of the
    fixture's images (experiments/parity/tip_adapter.py), encoded by the method's CLIP."""

    def __init__(self, clip: FrozenCLIP, fixture: dict[str, Any]) -> None:
        from experiments.parity.tip_adapter import validation, views

        self.clip, self.views = clip, views(fixture["views"]["count"])
        self.validation = validation()
        self.train_items = [SimpleNamespace(label=label) for label in range(len(fixture["classnames"]))]
        self.val_items = [SimpleNamespace(label=int(label)) for label in self.validation[1]]

    @torch.no_grad()
    def image_features(self, split: str, views: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "train":
            assert views == len(self.views)
            pixels = torch.cat(self.views)
            labels = torch.arange(len(self.train_items)).repeat(views)
        else:
            pixels, labels = self.validation
        return self.clip.encode_image(images_of({"pixels": pixels})), labels


def with_scale_100(clip: FrozenCLIP) -> FrozenCLIP:
    """A copy of `clip` whose logit scale is 100, the constant of official code that hard-codes
    OpenAI's (Tip-Adapter, MMRL; the project takes CLIP's own, 14.3 for the random tiny CLIP)."""
    clip = copy.deepcopy(clip)
    with torch.no_grad():
        clip.model.logit_scale.fill_(math.log(100))
    return clip


def mmrl(clip: FrozenCLIP, tmp_path: Path) -> Differences:
    """yunncheng/MMRL: 5 shared tokens of dimension 512 in both blocks of coop-tiny (rep layers
    [1, 2]; the recipe's 6-12 need 12 blocks), fused logits, the four loss terms with Oxford Pets'
    weight 0.2, AdamW; CLIP's logit scale set to the official constant 100."""
    rep_layers = load("mmrl", clip)["rep_layers"]
    overrides = (f"method.module.rep_layers=[{','.join(map(str, rep_layers))}]",)
    return standard_parity("mmrl", with_scale_100(clip), tmp_path, overrides, digest=weights_digest(clip))[0]


def tip_adapter(clip: FrozenCLIP, tmp_path: Path) -> Differences:
    """gaopengcuhk/Tip-Adapter: the cache (keys: the mean of 10 views' normalised features), the
    search of alpha and beta on the validation set, the logits at the searched values; Tip-Adapter-F:
    the loss, the keys' gradient and the AdamW schedule of its fine-tuning. CLIP's logit scale is
    set to 100, the official constant (OpenAI's CLIP has it; the project uses CLIP's own)."""
    fixture = load("tip_adapter", clip)
    clip = with_scale_100(clip)
    images, labels = images_of(fixture), fixture["labels"]
    diffs = {}
    for name in ("tip_adapter", "tip_adapter_f"):
        method, cfg = project_method(name, clip, fixture["classnames"], tmp_path)
        assert method.templates == [fixture["template"]]
        method._trainer = SimpleNamespace(datamodule=CacheData(clip, fixture))  # before any fit
        method.setup("fit")
        method.on_fit_start()  # builds the cache; Tip-Adapter searches alpha and beta
        method._trainer = None
        with torch.no_grad():
            features = clip.encode_image(images)
        if name == "tip_adapter":
            keys = max_diff(method.keys, fixture["cache_keys"])
            assert keys <= 1e-6, f"cache keys differ by {keys:.2e}"
            assert torch.equal(method.values, fixture["cache_values"])
            searched = fixture["searched"]
            assert (float(method.alpha), float(method.beta)) == (searched["alpha"], searched["beta"])
            with torch.no_grad():
                zero_shot = method.logits(features, alpha=0.0)
                diffs |= compare_logits(zero_shot, fixture["zero_shot_logits"], "zero-shot logits")
                diffs |= compare_logits(method(images), fixture["logits"]) | {"cache keys": keys}
            continue
        official = fixture["finetune"]
        with torch.no_grad():
            logits = method.logits(features, method.init_alpha, method.init_beta)
        diffs |= compare_logits(logits, official["logits"], "F logits")
        method.log = lambda *args, **kwargs: None
        loss = method.training_step((images, labels), 0)
        diffs |= {f"F {k}": v for k, v in compare_terms({"ce": loss}, official["loss"]).items()}
        loss.backward()
        diffs |= compare_grads({"keys": method.keys.grad}, official["grads"], "F grads")
        diffs |= {f"F {k}": v for k, v in compare_schedule(method, cfg, official).items()}
    return diffs


# Each method's comparison and the CLIP it runs on, by fixture name (experiments/parity/
# differences.py tables them all).
PARITY = {
    "kgcoop": (kgcoop, TINY),
    "maple": (maple, WIDE),
    "ivlp": (ivlp, TINY),
    "promptsrc": (promptsrc, TINY),
    "prograd": (prograd, TINY),
    "clip_lora": (clip_lora, TINY),
    "tip_adapter": (tip_adapter, TINY),
    "dept": (dept, TINY),
    "mmrl": (mmrl, TINY),
    "tpt": (tpt, TINY),
}


@pytest.fixture(scope="session")
def tiny_b16_clip() -> FrozenCLIP:
    """coop-tiny-b16 (tests/fixtures/parity/coop-tiny-b16.json): ViT-B/16's widths in 3 blocks, for
    official code that hard-codes them; random weights of seed 0."""
    return project_clip(WIDE)


@pytest.mark.parametrize("name", sorted(PARITY))
def test_the_method_computes_what_the_official_code_computes(name, request):
    compare, model = PARITY[name]
    clip = request.getfixturevalue("tiny_clip" if model == TINY else "tiny_b16_clip")
    compare(clip, request.getfixturevalue("tmp_path"))

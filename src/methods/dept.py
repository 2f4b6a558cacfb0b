"""DePT (Zhang et al., "DePT: Decoupled Prompt Tuning", CVPR 2024): a CoOp-family method plus a
channel-adjusted transfer (CAT) head on its features, trained together, used on the trained classes."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.methods.base import (
    LIGHTNING_HOOKS,
    Method,
    ValidatesAccuracy,
    class_path,
    import_method,
    method_arguments,
    method_from_prompt,
    overridden,
)
from src.methods.coop import CoOp
from src.models.clip import Architecture, FrozenCLIP

HEAD = "head."  # the state-dict prefix of DePT's own parameters
# The base's Lightning hooks that DePT runs for it (it forwards these); a base with any other
# Lightning hook of its own would train otherwise than alone, and is refused.
FORWARDED_HOOKS = (
    "on_train_start",
    "on_train_epoch_end",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
    "on_test_epoch_start",
    "on_test_epoch_end",
)


class ChannelWise(nn.Module):
    """The channel-wise transformation (cwT): a learned scale (from 1) and shift (from 0) per
    feature channel, on unnormalised features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features * self.scale + self.shift


class CATHead(nn.Module):
    """Image and text features, each through its own cwT, classified by one linear layer over the
    trained classes (PyTorch's default init, as the reference)."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.image_cwt = ChannelWise(dim)
        self.text_cwt = ChannelWise(dim)
        self.linear = nn.Linear(dim, n_classes)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.image_cwt(image_features))

    def training_logits(
        self, image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [2b, n_cls] and labels [2b]: each image's ground-truth class text feature is a
        sample too, before the images (the reference's order)."""
        samples = torch.cat([self.text_cwt(text_features)[labels], self.image_cwt(image_features)])
        return self.linear(samples), torch.cat([labels, labels])


class DePT(ValidatesAccuracy, Method):
    """A base method (`base`: a CoOp-family class path, built with `base_args`, or a built one)
    whose unnormalised image and class text features also feed a CAT head over its classes.

    Training: the base's loss terms, its `ce` (the loss of its logits) weighted 1 - cat_weight and
    its other terms unscaled (KgCoOp's `kg`), plus `cat`: cat_weight * cross-entropy of the CAT head
    on images and text features; the head's layers learn at `cat_lr_ratio` times the base's lr.
    Test on classes the head knows (`head_classnames`, the trained ones; any subset of them):
    (1 - cat_weight) * the base's logits + cat_weight * the head's, raw logits fused as the
    official code does; on any other class list (new classes, another dataset): the base's
    logits alone.
    """

    name = "dept"
    learns_context = True

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        base: str | CoOp,
        cat_weight: float = 0.7,
        cat_lr_ratio: float = 6.5,
        head_classnames: list[str] | None = None,
        **base_args: Any,
    ) -> None:
        super().__init__(clip, classnames)
        if isinstance(base, str):
            base = build_base(base, clip, classnames, base_args)
        self.base = base
        self.needs_images = base.needs_images  # as its base (the class's flag: `needs_images_for`)
        self.cat_weight = cat_weight
        self.cat_lr_ratio = cat_lr_ratio
        self.head_classnames = list(head_classnames or classnames)
        # Its init draws from a fork of the random stream: the rest of the run (batches, crops) draws
        # what it would for the base alone, so that cat_weight=0 is exactly the base's run.
        with torch.random.fork_rng(devices=[]):
            self.head = CATHead(clip.model.visual.output_dim, len(self.head_classnames))
        # The head's rows of the tested classes: all of them in training; None when some tested
        # class is not one the head was trained on (the base's logits alone).
        known = set(self.head_classnames)
        rows = [self.head_classnames.index(c) for c in classnames] if known.issuperset(classnames) else None
        self.register_buffer("head_rows", None if rows is None else torch.tensor(rows), persistent=False)

    @classmethod
    def check_config(cls, args: dict[str, Any], architecture: Architecture) -> None:
        """DePT's own options, then its base's, as the base checks them alone."""
        super().check_config(args, architecture)
        check_head(args["cat_weight"], args["cat_lr_ratio"])
        given = args["base"]
        if isinstance(given, Method):  # a built base: its own options were checked when it was
            check_base(type(given))
            return
        base = base_class(given)
        check_base(base)
        own = inspect.signature(cls.__init__).parameters
        base_args = method_arguments(base, {k: v for k, v in args.items() if k not in own})
        base.check_config(base_args, architecture)

    @classmethod
    def transfer_refusal(cls, options: dict[str, Any]) -> str | None:
        """As its base's (on other classes DePT is its base alone); `options`: DePT's arguments or
        its prompt file's state (the base's state, and DePT's record under `dept`)."""
        base = options["dept"]["base_class"] if "dept" in options else options["base"]
        return (type(base) if isinstance(base, Method) else base_class(base)).transfer_refusal(options)

    @classmethod
    def needs_images_for(cls, args: dict[str, Any]) -> bool:
        base = args["base"]
        return (type(base) if isinstance(base, Method) else base_class(base)).needs_images

    # -- the method ---------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images [b, 3, h, w] or of their image features [b, d]."""
        if self.head_rows is None:
            return self.base(images)
        image_features, text_features = self.base.features(images)
        base_logits = self.base.logits(image_features, text_features)
        head_logits = self.head(image_features)[:, self.head_rows]
        return (1 - self.cat_weight) * base_logits + self.cat_weight * head_logits

    def loss_terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base's terms on the base's features (its `ce` weighted 1 - cat_weight), then `cat`."""
        features = self.base.features(images)
        terms = self.base.loss_terms(images, labels, features)
        terms["ce"] = (1 - self.cat_weight) * terms["ce"]
        head_logits, head_labels = self.head.training_logits(*features, labels)
        return {**terms, "cat": self.cat_weight * F.cross_entropy(head_logits, head_labels)}

    def param_groups(self) -> list[dict[str, Any]]:
        """The base's trained parameters, and the head's at `cat_lr_ratio` times the optimiser's lr
        (the recipe's `method.optimizer`: the base's)."""
        base = [p for p in self.base.parameters() if p.requires_grad]
        return [{"params": base}, {"params": list(self.head.parameters()), "lr_scale": self.cat_lr_ratio}]

    # The base's own epoch hooks (PromptSRC aggregates its prompts over the epochs); the base is
    # attached to the trainer as a child module (Lightning passes it on).
    def on_train_start(self) -> None:
        self.base.on_train_start()

    def on_train_epoch_end(self) -> None:
        self.base.on_train_epoch_end()

    # The base's once-per-evaluation preparation (CoOp encodes its prompts once).
    def on_validation_epoch_start(self) -> None:
        self.base.on_validation_epoch_start()

    def on_validation_epoch_end(self) -> None:
        self.base.on_validation_epoch_end()

    def on_test_epoch_start(self) -> None:
        self.base.on_test_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.base.on_test_epoch_end()

    # -- results and the prompt file ------------------------------------------------------------
    def result_fields(self) -> dict[str, Any]:
        return {
            **self.base.result_fields(),
            "base_method": self.base.name,
            "cat_weight": self.cat_weight,
            "cat_lr_ratio": self.cat_lr_ratio,
            "cat_head": self.head_rows is not None,  # False: the base's logits alone (other classes)
        }

    def method_state(self) -> dict[str, Any]:
        # The base's own state at the top, as in its own prompt file (src.interpret reads the
        # context there), and the head beside it.
        head = {n: t for n, t in self.trained_weights().items() if n.startswith(HEAD)}
        dept = {
            "base_class": class_path(type(self.base)),
            "base_method": self.base.name,
            "cat_weight": self.cat_weight,
            "cat_lr_ratio": self.cat_lr_ratio,
            "head_classnames": self.head_classnames,
            "head": head,
        }
        return {**self.base.method_state(), "dept": dept}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("base.clip.")]:  # the base's CLIP: the same
            del state[key]

    @classmethod
    def from_prompt(
        cls,
        state: dict[str, Any],
        clip: FrozenCLIP,
        classnames: list[str] | None = None,
        template: str | None = None,
    ) -> DePT:
        """The base rebuilt from its state (for `classnames`, as its own class allows) and the head
        of the trained classes."""
        dept = state["dept"]
        base_state = {**state, "class": dept["base_class"], "method": dept["base_method"]}
        base = method_from_prompt(base_state, clip, classnames, template=template)
        module = cls(
            clip,
            base.classnames,
            base,
            cat_weight=dept["cat_weight"],
            cat_lr_ratio=dept["cat_lr_ratio"],
            head_classnames=dept["head_classnames"],
        )
        base_params = tuple(n for n, p in module.named_parameters() if not n.startswith(HEAD))
        module.load_trained_weights(dept["head"], f"the prompt file of {state['method']}", base_params)
        module.name = state["method"]
        return module


def build_base(target: str, clip: FrozenCLIP, classnames: list[str], args: dict[str, Any]) -> Method:
    """The base method of a config. Built here, outside DePT's __init__, so that its saved
    hyper-parameters (Lightning reads them from the __init__ frames above) are its own only."""
    return base_class(target)(clip, classnames, **args)


def base_class(target: Any) -> type[Method]:
    """The base method's class (`method.module.base`), or one line saying why it cannot be one."""
    return import_method(target, "method.module.base", "give a method class, e.g. method.base=coop, or ")


def check_head(cat_weight: float, cat_lr_ratio: float) -> None:
    if not 0 <= cat_weight <= 1 or cat_lr_ratio <= 0:
        raise ValueError(
            f"method.module.cat_weight={cat_weight}, method.module.cat_lr_ratio={cat_lr_ratio}: "
            "use a weight in [0, 1] and a positive ratio"
        )


def check_base(cls: type[Method]) -> None:
    """DePT trains and tests its base through CoOp's model (`features`, `logits`, `loss_terms`,
    `optimization`) and the hooks it forwards (FORWARDED_HOOKS): a base that predicts or trains
    through code of its own elsewhere would run otherwise than alone, and is refused."""
    if not issubclass(cls, CoOp):
        reason = "it is not a CoOp-family method (a subclass of src.methods.coop.CoOp)"
    elif overridden(cls, CoOp, ("forward",)) and not overridden(cls, CoOp, ("features",)):
        reason = "its logits come from a forward of its own, not from its `features` (CoCoOp's: per image)"
    elif overridden(cls, CoOp, ("training_step",)):
        reason = "its loss is a training step of its own, not its `loss_terms`"
    else:
        others = LIGHTNING_HOOKS - {"forward", "training_step", *FORWARDED_HOOKS, *TRAINED_BY_DEPT}
        own = overridden(cls, CoOp, others)
        if not own:
            return
        reason = f"it trains through Lightning hooks of its own ({', '.join(own)})"
    raise ValueError(
        f"method.module.base={class_path(cls)}: DePT cannot train this base as it trains alone: {reason}; "
        "bases: method/base=coop|kgcoop|maple|promptsrc"
    )


# What DePT runs of its base besides the hooks it forwards: its optimiser (with the head's group).
TRAINED_BY_DEPT = ("configure_optimizers",)

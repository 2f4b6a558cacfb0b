"""The method contract: what every method is, asked by every entry point.

A method is one class, a subclass of `Method`, and one config, `conf/method/<name>.yaml` (its
`name`, and `module`: the class as a Hydra `_target_` with its recipe). src.train, src.eval,
src.protocols, src.report, src.predict and src.interpret ask the class (or what it wrote into
results.json and prompt.pt), never a list of names, so a class in the user's own package is a
method like the project's own (README, "Add a method"). The class is found one way,
`import_method`, from a config's `_target_`, a prompt file's `class` or DePT's `base`.

What a class gives, all optional but `forward`:

- `forward(images)`: class logits of a batch of images, or of their cached image features;
- `loss_terms(images, labels)`: the named, weighted terms of a batch's loss. The one
  `training_step` sums them (`total_loss`) and logs each; a pack (src/packing/module.py) and DePT
  call the same terms, so an override of `loss_terms` (or of what it calls, CoOp's `loss`) trains
  alike alone, packed and under DePT. A method that needs another step overrides `training_step`
  (ProGrad's gradient projection): its runs then train alone, which is derived, never declared;
- the flags below, each read by every entry point it concerns;
- `check_config(args, architecture)`: the one place its options are checked, before the run
  folder is claimed (constructors do not check them again; `create` checks, then builds);
- `result_fields()`, `method_state()` and `from_prompt()`: what it writes into results.json and
  prompt.pt, and its rebuild from prompt.pt.

Its optimiser and schedule are its config's (`method.optimizer`, `method.scheduler`: Hydra
partials), given to it by `build_method` (`use_recipe`); the inherited `configure_optimizers` applies
them to the parameters that train (`param_groups`).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics.classification import MulticlassAccuracy

from src.common.messages import override
from src.common.prompt_file import CHECKPOINT_PROMPT, PROMPT_FORMAT
from src.methods.schedules import RunLength
from src.models.clip import Architecture, FrozenCLIP

LossTerms = dict[str, torch.Tensor]  # a batch's loss by its named terms, each already weighted


class MethodOptionError(ValueError):
    """A method's options that do not fit each other or the backbone. A method raises it (or a plain
    ValueError) from `check_config` or its constructor, in the project or in the user's own package,
    and the command reports it as one `error:` line, before the run folder is claimed."""


class Method(pl.LightningModule):
    """A classifier over a frozen CLIP, trained (or not) on few labelled images and tested on a
    dataset's test split: top-1 accuracy over all test images (the paper's number) and mean
    per-class accuracy, synced across devices by torchmetrics.

    Subclasses give `forward(images)`: class logits of a batch of images [b, 3, h, w], or of their
    frozen image features [b, d] when the data module caches them (unless `needs_images`); a
    method that trains gives `loss_terms`, which the one `training_step` sums.
    """

    # results.json's `method`: the config's `method.name` (`build_method`) or the prompt file's
    name: str = "method"
    # -- what the method is: known from the class, before anything is built; each flag is read by
    # every entry point it concerns (src/run/: training, its checks, evaluation; src.protocols) ---
    # A learned prompt context: results tell its variants apart (ctx, class token position, M).
    learns_context: ClassVar[bool] = False
    # It needs raw images, never cached image features (its prompts or adapters change the image
    # encoder, or it augments test images): the run turns the feature cache off by itself and
    # refuses data.train_views before the run folder is claimed.
    needs_images: ClassVar[bool] = False
    # Its logits are CLIP's: image features against class text features that do not depend on the
    # image (`text_features()`); such prompts average in an ensemble (ensemble=features).
    text_classifier: ClassVar[bool] = False
    # trainer.fit runs before the test; False: straight to the test (what it fits, it fits there).
    trains: ClassVar[bool] = True
    # Its trained weights serve other class lists (a prompt rebuilt on new classes, another
    # dataset): base-to-new tests it on the new classes; False: weights one per trained class.
    transfers: ClassVar[bool] = True
    # Uses no labelled image: its result depends on neither the shots nor the seed, and
    # base-to-new runs it on the new classes directly.
    zero_shot: ClassVar[bool] = False
    # Whether runs of a sweep train together (`pack=true`) is not declared: it is derived from what
    # the class overrides (src/packing/module.py, `step_refusal`).

    @classmethod
    def check_config(cls, args: dict[str, Any], architecture: Architecture) -> None:
        """Raises ValueError, one line naming the option and a fix to paste
        (src.common.messages.override), when the method's arguments do not fit each other or the
        backbone; the one place they are checked, before the run folder is claimed and before any
        weights load (src/run/checks.py), and again by `build_method` and `create`. `args` are
        `method.module`'s values with the constructors' defaults filled in (`method_arguments`);
        `architecture` is read from open_clip's config of `model.name`. An override checks its own
        arguments and calls super()'s."""

    @classmethod
    def create(cls, clip: FrozenCLIP, classnames: list[str], **args: Any) -> Method:
        """The method built with `args` once `check_config` has passed: what a run does from its
        config (`build_method`), for code that builds a method by hand (constructors do not check
        their options again)."""
        check_options(cls, method_arguments(cls, args), Architecture.of(clip.name))
        with options_refused():
            return cls(clip, classnames, **args)

    def __init__(self, clip: FrozenCLIP, classnames: list[str]) -> None:
        super().__init__()
        self.clip = clip
        self.classnames = list(classnames)
        # Checkpoints hold the method's own state; CLIP comes from its own weights.
        self.strict_loading = False
        self.test_acc = MulticlassAccuracy(num_classes=len(classnames), average="micro")
        self.test_macro_acc = MulticlassAccuracy(num_classes=len(classnames), average="macro")
        self.optimizer: Callable[..., torch.optim.Optimizer] | None = None
        self.scheduler: Callable[..., dict[str, Any]] | None = None

    @classmethod
    def transfer_refusal(cls, options: dict[str, Any]) -> str | None:
        """Why the method built with `options` (its arguments, or its prompt file's state) cannot
        serve other class lists than its trained one; None when it can (`transfers`, unless an
        option makes its weights one per class: CoOp's class-specific context)."""
        return None if cls.transfers else "its trained weights are one per class of its trained class list"

    @classmethod
    def needs_images_for(cls, args: dict[str, Any]) -> bool:
        """`needs_images` of the method built with `args` (`method_arguments`): the class's flag,
        unless what the method is depends on an option (DePT's base)."""
        return cls.needs_images

    # -- training: the one step of every method that trains by a loss ------------------------
    def loss_terms(self, images: torch.Tensor, labels: torch.Tensor) -> LossTerms:
        """The named terms of a batch's training loss, each already weighted: the step sums them
        and logs each as `train/<name>`. A method that trains by gradient gives this (CoOp: `ce`,
        the loss of its logits; KgCoOp adds `kg`, PromptSRC `scl_*`, DePT `cat`)."""
        raise NotImplementedError(f"{class_path(type(self))} trains, so it gives `loss_terms`")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The one training step: the batch's loss terms, summed and logged. A method that needs
        another step (a gradient projection, a search) overrides this, and by that alone its runs
        train alone (src/packing/module.py, `step_refusal`)."""
        images, labels = batch
        terms = self.loss_terms(images, labels)
        loss = total_loss(terms)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        for name, term in term_metrics(terms).items():
            self.log(name, term, batch_size=len(labels))
        return loss

    # -- the optimiser and schedule of the method's config ----------------------------------------
    def use_recipe(
        self,
        optimizer: Callable[..., torch.optim.Optimizer] | None,
        scheduler: Callable[..., dict[str, Any]] | None = None,
    ) -> None:
        """The optimiser and schedule factories that `configure_optimizers` applies: the run's
        `method.optimizer` (`optimizer(param_groups)`, e.g. a `torch.optim.SGD` partial) and
        `method.scheduler` (`scheduler(optimizer, length)`, `src.methods.schedules`)."""
        self.optimizer, self.scheduler = optimizer, scheduler

    def param_groups(self) -> list[dict[str, Any]]:
        """The parameter groups the optimiser gets: one group of every parameter that trains (CLIP's
        never do). A group may carry `lr_scale`: its lr is the optimiser's lr times that (DePT's head)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> Any:
        """Lightning's hook: `optimization` for the trainer's run."""
        return self.optimization(RunLength.of(self.trainer))

    def optimization(self, length: RunLength, groups: list[dict[str, Any]] | None = None) -> Any:
        """The recipe's optimiser over `groups` (`param_groups` when None) and its schedule for a run
        of `length`, as configure_optimizers gives Lightning (a pack asks without a trainer). None
        when the method has no optimiser and trains nothing (zero-shot, training-free, test-time)."""
        groups = self.param_groups() if groups is None else groups
        if self.optimizer is None:
            if type(self).trains and any(p.requires_grad for group in groups for p in group["params"]):
                raise MethodOptionError(
                    f"{class_path(type(self))} has parameters that train and no optimiser: give "
                    "method.optimizer in its config (or Method.use_recipe when building it by hand)"
                )
            return None
        scales = [group.pop("lr_scale", None) for group in groups]
        optimizer = self.optimizer(groups)
        for group, scale in zip(optimizer.param_groups, scales, strict=True):
            if scale is not None:
                group["lr"] = group["lr"] * scale
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer, length)}

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.test_acc(logits, labels)
        self.test_macro_acc(logits, labels)
        self.log("test/acc", self.test_acc, batch_size=len(labels))
        self.log("test/macro_acc", self.test_macro_acc, batch_size=len(labels))

    # -- what a run writes ----------------------------------------------------------------------
    def result_fields(self) -> dict[str, Any]:
        """What the method adds to results.json (a learned context's settings; none here)."""
        fields = ("ctx", "n_ctx", "ctx_init", "ctx_init_count", "class_token_position")
        return dict.fromkeys(fields)

    def contract_fields(self) -> dict[str, Any]:
        """What results.json says of the method itself, for src.report."""
        cls = type(self)
        return {
            "method_class": class_path(cls),
            "learns_context": cls.learns_context,
            "zero_shot": cls.zero_shot,
        }

    def method_state(self) -> dict[str, Any] | None:
        """What prompt.pt holds of the method (its learned tensors and what rebuilds it), besides the
        keys of every prompt file (`prompt_state`); None: nothing to save."""
        return None

    @classmethod
    def from_prompt(
        cls,
        state: dict[str, Any],
        clip: FrozenCLIP,
        classnames: list[str] | None = None,
        template: str | None = None,
    ) -> Method:
        """The method rebuilt from a prompt file's state, for its own class list (None) or another;
        `template` is the hand-made template of the dataset it is tested on, for a method whose
        prompts are made from its dataset's (MMRL); None: the one it was trained with."""
        raise ValueError(f"{class_path(cls)} writes no prompt file and cannot be rebuilt from one")

    @classmethod
    def rebuilt(
        cls, state: dict[str, Any], clip: FrozenCLIP, classnames: list[str] | None, hparams: dict[str, Any]
    ) -> Method:
        """`from_prompt`'s common case: the class built with `hparams` on the prompt file's backbone,
        for `classnames` (None: its own), with the trained tensors the file holds."""
        check_backbone(state, clip)
        module = cls(clip, list(classnames or state["classnames"]), **constructor_hparams(cls, hparams))
        module.load_trained_weights(state["weights"], f"the prompt file of {state['method']}")
        module.name = state["method"]
        return module

    def prompt_state(self) -> dict[str, Any] | None:
        """prompt.pt's contents: `method_state()` and what every prompt file says (the method's name
        and class, the backbone, the class names); None for a method with nothing to save."""
        state = self.method_state()
        if state is None:
            return None
        return {
            "format": PROMPT_FORMAT,
            "method": self.name,
            "class": class_path(type(self)),
            "backbone": self.clip.name,
            "pretrained": self.clip.pretrained,
            "backbone_seed": self.clip.seed,  # random weights: the seed that rebuilds them
            "classnames": list(self.classnames),
            **state,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("clip.")]:
            del state[key]
        prompt = self.prompt_state()
        if prompt is not None:
            # What prompt.pt holds, so that src.eval, src.predict and src.interpret take an unfinished
            # run's last.ckpt too; its tensors are the state dict's, which torch.save writes once.
            for key, tensor in prompt.get("weights", {}).items():
                prompt["weights"][key] = state.get(key, tensor)
            checkpoint[CHECKPOINT_PROMPT] = prompt

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A resumed run's checkpoint must hold every trained tensor: Lightning loads it non-strictly
        # (CLIP's weights are not in it) and would otherwise leave missing ones as initialised.
        problem = self._unfitting(checkpoint["state_dict"])
        if problem:
            raise ValueError(
                f"{self.trainer.ckpt_path} does not fit {class_path(type(self))} ({problem}): it was "
                "written by another method or version; delete it to start the run over, or keep this "
                "folder as it is and give the run another one with hydra.run.dir=<folder>"
            )

    # -- the trained tensors, by name, for prompt files -----------------------------------------
    def trained_weights(self, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Every parameter that trains (CLIP's never do), on the CPU, by its state-dict name."""
        return {
            name: param.detach().cpu().clone()
            for name, param in self.named_parameters()
            if param.requires_grad and name not in exclude
        }

    def load_trained_weights(
        self, weights: dict[str, torch.Tensor], source: str, exclude: tuple[str, ...] = ()
    ) -> None:
        """Loads what `trained_weights` saved; every trained parameter must be there, in its shape."""
        problem = self._unfitting(weights, exclude)
        if problem:
            raise ValueError(
                f"{source} does not fit {class_path(type(self))}: {problem}; it was saved by another "
                "version of the method: train it again"
            )
        with torch.no_grad():
            for name, param in self.named_parameters():
                if param.requires_grad and name not in exclude:
                    param.copy_(weights[name])

    def _unfitting(self, weights: dict[str, torch.Tensor], exclude: tuple[str, ...] = ()) -> str:
        """What keeps `weights` from loading into the trained parameters ('' when nothing does)."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad and n not in exclude}
        missing = sorted(set(params) - set(weights))
        wrong = sorted(n for n in set(params) & set(weights) if weights[n].shape != params[n].shape)
        if missing:
            return f"it lacks {missing[:5]}"
        return f"{wrong[:5]} have other shapes" if wrong else ""


class ValidatesAccuracy:
    """For a method (listed before `Method` in its bases) validated by its top-1 accuracy on the
    few-shot validation split (`val_acc`, logged as `val/acc` every trainer.check_val_every_n_epoch
    epochs, never drawing from the training's random stream): the validation step of a method
    whose `forward` gives class logits."""

    def __init__(self, clip: FrozenCLIP, classnames: list[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(clip, classnames, *args, **kwargs)
        self.val_acc = MulticlassAccuracy(num_classes=len(classnames), average="micro")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.val_acc(self(images), labels)
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=len(labels))


class TextOncePerEvaluation:
    """For a method (listed before `Method` in its bases) whose class text features change only
    while it trains: they are encoded once at the start of each validation and test pass, into
    `_eval_text_features`, which its forward reads instead of encoding them for every batch."""

    _eval_text_features: torch.Tensor | None = None

    def _start_eval(self) -> None:
        with torch.no_grad():
            self._eval_text_features = self.text_features()

    def _end_eval(self) -> None:
        self._eval_text_features = None

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def on_validation_epoch_end(self) -> None:
        self._end_eval()

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def on_test_epoch_end(self) -> None:
        self._end_eval()


def term_metrics(terms: LossTerms) -> dict[str, torch.Tensor]:
    """What a step logs of its terms beside `train/loss`: each term as `train/<name>`, when there
    are several (a single term is the loss itself)."""
    return {f"train/{name}": term for name, term in terms.items()} if len(terms) > 1 else {}


def total_loss(terms: LossTerms) -> torch.Tensor:
    """A step's loss: the sum of its terms, in their order (a single term is itself, exactly)."""
    if not terms:
        raise ValueError("a training step needs at least one loss term")
    return sum(terms.values())  # type: ignore[return-value]


# Lightning's API of a LightningModule (its hooks, steps and optimiser calls), read from Lightning's
# own classes: what a method may override to change how it trains.
LIGHTNING_HOOKS = frozenset(
    name
    for klass in pl.LightningModule.__mro__
    if klass.__module__.startswith(("pytorch_lightning.", "lightning."))
    for name, value in vars(klass).items()
    if callable(value) and not name.startswith("_")
)


def overridden(cls: type, reference: type, names: frozenset[str] | tuple[str, ...]) -> list[str]:
    """Which of `names` `cls` defines otherwise than `reference` (a class it extends), sorted."""
    return sorted(name for name in names if getattr(cls, name, None) is not getattr(reference, name, None))


def check_backbone(state: dict[str, Any], clip: FrozenCLIP) -> None:
    """A prompt file is used on the backbone it was learned on (random weights: of its seed)."""
    if (clip.name, clip.pretrained) != (state["backbone"], state["pretrained"]):
        raise ValueError(
            f"the prompt was learned on {state['backbone']} ({state['pretrained'] or 'random weights'}), "
            f"not {clip.name} ({clip.pretrained or 'random weights'}): use "
            f"{override('model.name', state['backbone'])} {override('model.pretrained', state['pretrained'])}"
        )
    seed = state.get("backbone_seed")  # files from before it was recorded: not checked
    if clip.pretrained is None and seed is not None and clip.seed != seed:
        raise ValueError(
            f"seed={clip.seed}: the prompt was learned on {clip.name}'s random weights of seed {seed}, "
            f"which only that seed rebuilds: use seed={seed} (or leave seed= out: it is the default)"
        )


def class_path(cls: type) -> str:
    """`package.module.Class`: where a prompt file's method class is imported from."""
    return f"{cls.__module__}.{cls.__qualname__}"


CLASS_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def import_method(path: Any, source: str, fix: str = "") -> type[Method]:
    """The one way a method's class is found: `path` (`package.module.Class`, as a config's
    `_target_`, a prompt file's `class` or DePT's `base`) imported, and used only if it is a
    subclass of the contract. `source` names where the path was given, for the error line, and
    `fix` is said when its module cannot be imported (besides putting its package on PYTHONPATH)."""
    if not isinstance(path, str) or not CLASS_PATH.match(path):
        raise ValueError(f"{source}: {path!r} is not a class path (package.module.Class)")
    module_name, _, name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        package = module_name.split(".")[0]
        raise ValueError(
            f"{source}: {path} cannot be imported ({err}): {fix}put the folder that holds the "
            f"package {package!r} on PYTHONPATH"
        ) from err
    cls = getattr(module, name, None)
    if cls is None:
        raise ValueError(f"{source}: {path} is not there: was the class renamed or moved?")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(
            f"{source}: {path} is not a method (a subclass of src.methods.base.Method); a method's "
            "class extends Method (or CoOp)"
        )
    return cls


def method_class(method_cfg: DictConfig) -> type[Method]:
    """The class of a run's method (`method.module._target_`)."""
    return import_method(method_cfg.module._target_, f"method={method_cfg.name}: method.module._target_")


def method_from_prompt(
    state: dict[str, Any],
    clip: FrozenCLIP,
    classnames: list[str] | None = None,
    file: str | Path = "",
    template: str | None = None,
) -> Method:
    """The method a prompt file's state holds (src/common/prompt_file.py reads it), rebuilt on `clip`
    for its own classes or `classnames` (and `template`, the tested dataset's hand-made template:
    `Method.from_prompt`)."""
    return prompt_method_class(state, file).from_prompt(state, clip, classnames, template)


def prompt_method_class(state: dict[str, Any], file: str | Path = "") -> type[Method]:
    """The method class a prompt file's state names (`class`)."""
    source = f"{file or 'the prompt file'}, written by method {state['method']!r}, names its class"
    return import_method(state["class"], source)


def method_arguments(cls: type[Method], module_cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The arguments a method's constructor gets from `method.module` (resolved), with the defaults
    of its signature and of the constructors it forwards the rest to (`**coop_args`) filled in:
    what `Method.check_config` checks."""
    args = {k: v for k, v in plain(module_cfg).items() if not k.startswith("_")}
    for klass in cls.__mro__:
        if issubclass(klass, Method) and "__init__" in vars(klass):
            for name, param in inspect.signature(klass.__init__).parameters.items():
                if param.default is not inspect.Parameter.empty:
                    args.setdefault(name, param.default)
    return args


# A prompt file's hyper-parameters from before the optimiser and schedule moved into the config
# (method.optimizer, method.scheduler): no longer constructor arguments, left out of a rebuild.
FORMER_RECIPE_ARGUMENTS = frozenset(
    {"lr", "momentum", "weight_decay", "warmup_epochs", "warmup_lr", "betas", "eps", "eta_min"}
)


def constructor_hparams(cls: type[Method], hparams: dict[str, Any]) -> dict[str, Any]:
    """A prompt file's `hparams` that `cls` still takes: those of older files that are now the
    config's recipe (FORMER_RECIPE_ARGUMENTS) left out."""
    taken = {
        name
        for klass in cls.__mro__
        if issubclass(klass, Method) and "__init__" in vars(klass)
        for name in inspect.signature(klass.__init__).parameters
    }
    return {k: v for k, v in hparams.items() if k in taken or k not in FORMER_RECIPE_ARGUMENTS}


def build_method(method_cfg: DictConfig, clip: FrozenCLIP, classnames: list[str]) -> Method:
    """The method of a run's config (`method.module`, named `method.name`), its options checked
    first (`Method.check_config`: constructors do not check them again)."""
    from hydra.utils import instantiate  # noqa: PLC0415  (Hydra only where a config is built)

    cls = method_class(method_cfg)
    check_options(cls, method_arguments(cls, method_cfg.module), Architecture.of(clip.name))
    with options_refused():
        module = instantiate(method_cfg.module, clip=clip, classnames=classnames)
    module.name = method_cfg.name
    module.use_recipe(*recipe_factories(method_cfg))
    return module


def recipe_factories(method_cfg: DictConfig) -> tuple[Callable[..., Any] | None, Callable[..., Any] | None]:
    """The optimiser and schedule factories of a method's config (`method.optimizer`,
    `method.scheduler`: Hydra partials; absent or null: none)."""
    from hydra.utils import instantiate  # noqa: PLC0415  (Hydra only where a config is built)

    return tuple(  # type: ignore[return-value]
        None if OmegaConf.select(method_cfg, key) is None else instantiate(method_cfg[key])
        for key in ("optimizer", "scheduler")
    )


def check_options(cls: type[Method], args: dict[str, Any], architecture: Architecture) -> None:
    """`cls.check_config(args, architecture)`, a ValueError it raises as a `MethodOptionError`."""
    with options_refused():
        cls.check_config(args, architecture)


@contextmanager
def options_refused() -> Iterator[None]:
    """A ValueError from a method's own code (its checks, its constructor; the user's package's too)
    as a `MethodOptionError`, which the command reports as one line. Hydra wraps a constructor's
    error in its own; the method's is taken out of it."""
    from hydra.errors import InstantiationException  # noqa: PLC0415  (Hydra only where a config is built)

    try:
        yield
    except MethodOptionError:
        raise
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ValueError) and not isinstance(cause, MethodOptionError):
            raise MethodOptionError(str(cause)) from cause
        if isinstance(cause, MethodOptionError):
            raise cause from None
        raise
    except ValueError as err:
        raise MethodOptionError(str(err)) from err


def plain(value: Any) -> Any:
    """Hyper-parameters as plain Python data (a config's lists and dicts too), loadable with
    `torch.load(weights_only=True)`."""
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value

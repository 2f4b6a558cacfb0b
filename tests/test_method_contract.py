"""The method contract: a method is one class and one config, in the project or in the user's own
package, and every entry point asks the class (src/methods/base.py)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from src.common.files import save_torch
from src.common.prompt_file import load_prompt
from src.methods.base import Method, method_from_prompt
from src.methods.cocoop import CoCoOp
from src.methods.coop import CoOp
from src.methods.kgcoop import KgCoOp
from src.methods.maple import MaPLe
from src.methods.prograd import ProGrad
from src.methods.tip_adapter import TipAdapter

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("train", "eval", "protocols", "report", "predict", "interpret")


SECOND_EXAMPLE = "\n### A method that is not CoOp's child\n"


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def run_example(section: str, folder: Path, cache_dir: Path) -> None:
    """A README example's files written into `folder` (each block names its file) and its bash
    block run there as written, with this project's Python as `python`."""
    blocks = code_blocks(section)
    (commands,) = [code for lang, code in blocks if lang == "bash"]
    for lang, code in blocks:
        if lang in ("python", "yaml"):
            path = folder.parent / code.splitlines()[0].lstrip("# ").split()[0]  # the block names its file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(code)
    (folder / "my_methods" / "__init__.py").touch()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # `python`: this one
        "COOP_CACHE": str(cache_dir),
        "OMP_NUM_THREADS": "2",
    }
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        ["bash", "-e", "-c", commands], cwd=folder, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]


def code_blocks(section: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def test_the_readmes_example_method_trains_evaluates_and_reports_under_its_own_name(tmp_path, cache_dir):
    """The README's "Add a method", copied into a folder outside the project and run as written."""
    folder = tmp_path / "my_methods"
    run_example(readme_section("Add a method").split(SECOND_EXAMPLE)[0], folder, cache_dir)

    run = folder / "outputs/digits/smoothed_coop/coop-tiny-narrow_unified_m16_end/shots4/seed1"
    trained = json.loads((run / "results.json").read_text())
    assert trained["method"] == "smoothed_coop" and trained["smoothing"] == 0.1
    assert trained["method_class"] == "my_methods.smoothed_coop.SmoothedCoOp" and trained["learns_context"]
    evaluated = json.loads((run / "eval" / "digits" / "results.json").read_text())
    assert evaluated["method"] == "smoothed_coop" and evaluated["smoothing"] == 0.1
    assert evaluated["test_acc"] == pytest.approx(trained["test_acc"])  # the same prompt, rebuilt
    report = (folder / "outputs" / "report" / "report.md").read_text()
    assert "| digits    | smoothed_coop unified end M16 |" in report
    assert "†" not in report  # its evaluation repeats its test: not a second run

    # Without the package on PYTHONPATH, its prompt file is one error line naming the class and the fix
    env = {**os.environ, "COOP_CACHE": str(cache_dir), "PYTHONPATH": ""}
    evaluation = subprocess.run(
        [sys.executable, "-m", "src.eval", f"ckpt={run}", "dataset=digits"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluation.returncode == 2
    (line,) = [line for line in evaluation.stderr.splitlines() if line.startswith("error:")]
    assert "my_methods.smoothed_coop.SmoothedCoOp" in line and "PYTHONPATH" in line and "'my_methods'" in line


def test_the_readmes_method_that_is_not_coops_child_runs_every_entry_point(tmp_path, cache_dir):
    """The README's second example (a `Method` written with the documented API), run as written:
    train, src.eval, base-to-new, a sweep over seeds and contexts, src.report."""
    folder = tmp_path / "my_methods"
    run_example(readme_section("Add a method").split(SECOND_EXAMPLE)[1], folder, cache_dir)
    run = folder / "outputs/digits/shifted_clip/coop-tiny-narrow/shots4/seed1"  # no context in its name
    trained = json.loads((run / "results.json").read_text())
    assert trained["method"] == "shifted_clip" and not trained["learns_context"]
    assert trained["test_acc"] > trained["zeroshot_acc"]  # the shift learned something
    evaluated = json.loads((run / "eval" / "digits" / "results.json").read_text())
    assert evaluated["test_acc"] == pytest.approx(trained["test_acc"])
    summary = json.loads((folder / "outputs" / "base_to_new" / "base_to_new.json").read_text())
    assert summary["datasets"]["digits"]["seeds"] == 1 and summary["average"]["H"] > 0
    swept = sorted(p.parent.name for p in (folder / "outputs" / "sweep").rglob("results.json"))
    assert swept == ["seed1", "seed2"]  # two context settings x two seeds: one run per seed
    report = (folder / "outputs" / "report" / "report.md").read_text()
    assert "| shifted_clip |" in report and "†" not in report


def test_a_prompt_file_naming_anything_but_a_method_is_refused(tiny_clip, tmp_path):
    state = CoOp(tiny_clip, ["cat", "dog"], n_ctx=2).prompt_state()
    for target, reason in [
        ("subprocess.Popen", "not a method"),
        ("os.system", "not a method"),
        ("src.methods.coop.Gone", "not there"),
        ("os.system('touch x')", "not a class path"),
    ]:
        file = save_torch(tmp_path / "prompt.pt", {**state, "class": target})
        with pytest.raises(ValueError, match=reason):
            method_from_prompt(load_prompt(file), tiny_clip)


@pytest.mark.parametrize("name", ["coop", "cocoop", "kgcoop", "maple", "tip_adapter_f"])
def test_prompt_files_written_before_the_contract_still_load(name, tiny_clip):
    """Files written by the code before the contract (tests/legacy_prompts/, made with the tiny
    CLIP of seed 0): rebuilt as their method, with their tensors."""
    file = Path(__file__).parent / "legacy_prompts" / f"{name}.pt"
    raw = torch.load(file, weights_only=True)
    assert "class" not in raw
    module = method_from_prompt(load_prompt(file), tiny_clip)
    expected = {"coop": CoOp, "cocoop": CoCoOp, "kgcoop": CoOp, "maple": MaPLe, "tip_adapter_f": TipAdapter}
    assert type(module) is expected[name] and module.name == name
    if name == "tip_adapter_f":
        torch.testing.assert_close(module.keys.detach(), raw["keys"])  # normalised again
        assert float(module.alpha) == raw["alpha"]
        return
    assert torch.equal(module.prompt_learner.ctx.detach(), raw["ctx"])
    if name == "cocoop":
        for key, tensor in raw["meta_net"].items():
            assert torch.equal(module.meta_net.state_dict()[key], tensor)
    if name == "maple":
        assert torch.equal(module.deep_text.detach(), raw["deep_text"])
        for key, tensor in raw["couplings"].items():
            assert torch.equal(module.couplings.state_dict()[key], tensor)


def test_a_successor_is_rebuilt_as_itself_with_its_arguments_and_tensors(tiny_clip, tmp_path):
    names = ["cat", "dog", "ship"]
    for module in (
        KgCoOp(tiny_clip, names, template="a photo of a {}.", weight=3.0),
        ProGrad(tiny_clip, names, template="a photo of a {}.", lambda_=0.8, n_ctx=8),
        CoCoOp(tiny_clip, names, n_ctx=2, prompts_per_pass=7),
        MaPLe(tiny_clip, names, prompt_depth=2),
    ):
        with torch.no_grad():
            for param in module.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param))
        file = save_torch(tmp_path / "prompt.pt", module.prompt_state())
        rebuilt = method_from_prompt(load_prompt(file), tiny_clip)
        assert type(rebuilt) is type(module) and rebuilt.hparams == module.hparams
        trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
        assert trained.keys() == {n for n, p in rebuilt.named_parameters() if p.requires_grad}
        for name, param in rebuilt.named_parameters():
            if param.requires_grad:
                assert torch.equal(param, trained[name]), name


# CoOp's arguments, forwarded by every successor, which states only its own and the defaults that differ
COOP_HPARAMS = {
    "classnames",
    "n_ctx",
    "ctx_init",
    "class_specific",
    "class_token_position",
    "ctx_init_count",
}


def test_saved_hyperparameters_keep_their_keys(tiny_clip):
    names = ["cat", "dog"]
    template = "a photo of a {}."
    assert set(CoOp(tiny_clip, names).hparams) == COOP_HPARAMS
    assert set(CoCoOp(tiny_clip, names).hparams) == COOP_HPARAMS | {"prompts_per_pass"}
    assert set(KgCoOp(tiny_clip, names, template=template).hparams) == COOP_HPARAMS | {"template", "weight"}
    prograd = ProGrad(tiny_clip, names, template=template)
    assert set(prograd.hparams) == COOP_HPARAMS | {"template", "lambda_", "temperature", "init_from_template"}
    assert set(MaPLe(tiny_clip, names, prompt_depth=2).hparams) == COOP_HPARAMS | {"prompt_depth"}
    kgcoop = KgCoOp(tiny_clip, names, template=template)
    assert (kgcoop.hparams.n_ctx, kgcoop.hparams.ctx_init, kgcoop.hparams.weight) == (4, "a photo of a", 8.0)


def test_every_method_of_the_project_is_a_method_and_its_config_names_it():
    for config in sorted((ROOT / "conf" / "method").glob("*.yaml")):
        method = OmegaConf.load(config)
        target = method.module._target_
        module_name, _, class_name = target.rpartition(".")
        assert module_name.startswith("src.methods."), config
        cls = getattr(__import__(module_name, fromlist=[class_name]), class_name)
        assert issubclass(cls, Method), config


def test_entry_points_import_helpers_never_each_other():
    for name in ENTRY_POINTS:
        tree = ast.parse((ROOT / "src" / f"{name}.py").read_text())
        imported = {
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        } | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not imported & {f"src.{other}" for other in ENTRY_POINTS}, name


def test_a_users_method_refusing_its_options_is_one_error_line(tmp_path, cache_dir):
    """A ValueError from the `check_config` of a method in the user's own package is one `error:` line
    (no traceback), before the run folder is claimed; an unknown method= says how methods of one's
    own package are found."""
    package = tmp_path / "mine" / "mine"
    package.mkdir(parents=True)
    (package / "__init__.py").touch()
    (package / "margin_coop.py").write_text(
        "from src.methods.coop import CoOp\n\n\n"
        "class MarginCoOp(CoOp):\n"
        "    def __init__(self, clip, classnames, margin: float = 0.1, **coop_args):\n"
        "        super().__init__(clip, classnames, **coop_args)\n"
        "        self.margin = margin\n\n"
        "    @classmethod\n"
        "    def check_config(cls, args, architecture):\n"
        "        super().check_config(args, architecture)\n"
        "        if args['margin'] < 0:\n"
        "            raise ValueError(f\"method.module.margin={args['margin']}: use a margin >= 0\")\n"
    )
    conf = tmp_path / "mine" / "conf" / "method"
    conf.mkdir(parents=True)
    (conf / "margin_coop.yaml").write_text(
        "defaults:\n  - coop\n  - _self_\nname: margin_coop\nmodule:\n"
        "  _target_: mine.margin_coop.MarginCoOp\n  margin: 0.1\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'mine'}{os.pathsep}{ROOT}", "COOP_CACHE": str(cache_dir)}
    run = tmp_path / "run"
    common = ["experiment=quickstart", f"hydra.run.dir={run}", f"hydra.searchpath=[file://{conf.parent}]"]
    for method, expected in (
        (
            ["method=margin_coop", "method.module.margin=-1"],
            "method.module.margin=-1: use a margin >= 0",
        ),
        (["method=margin"], "hydra.searchpath=[file://<folder>]"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "src.train", *common, *method],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert expected in line, line
        assert not (run / "fingerprint.json").exists()

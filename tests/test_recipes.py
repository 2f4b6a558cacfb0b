"""A method's recipe is its own config: ctx, data and trainer settings in places of its yaml that the
run reads, the optimiser and schedule as Hydra partials. Every method's resolved recipe is the one
it had before the recipes moved there (tests/fixtures/recipes.json, tests/recipes.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from src.run.config import RECIPE_PLACES, check_recipe_places
from tests.conftest import CONF_DIR, make_cfg
from tests.recipes import SNAPSHOT, snapshot


@pytest.fixture(scope="module")
def recipes() -> dict:
    from src.run.config import as_hydra_overrides

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # once for every config
        recipes = snapshot(lambda args, _: compose("train", as_hydra_overrides(args)), None)
    return json.loads(json.dumps(recipes))


def test_every_methods_recipe_is_unchanged(recipes: dict) -> None:
    expected = json.loads(SNAPSHOT.read_text())
    assert recipes.keys() == expected.keys()
    changed = [key for key in expected if recipes[key] != expected[key]]
    assert not changed, {key: (expected[key], recipes[key]) for key in changed[:2]}


def test_no_method_config_writes_outside_its_package() -> None:
    for path in Path(CONF_DIR, "method").rglob("*.yaml"):
        assert "@package _global_" not in path.read_text(), path


def test_each_recipe_place_reads_the_method(tmp_path: Path) -> None:
    """Every place the docs name is read by its group's config, and a value given for the setting
    itself wins over the method's."""
    cfg = make_cfg(["dataset=oxford_pets", "method=kgcoop"], tmp_path)
    imagenet = make_cfg(["dataset=imagenet", "method=kgcoop"], tmp_path)
    read_by = {  # places read by another setting than the one of their name
        "epochs_by_shots": (cfg.trainer, "max_epochs"),
        "epochs_by_subsample": (cfg.trainer, "max_epochs"),
        "imagenet_names": (imagenet.dataset.reader, "names"),
    }
    for group, places in RECIPE_PLACES.items():
        for key in places:
            node, source = read_by.get(key, (cfg[group], key))
            raw = OmegaConf.to_container(node, resolve=False)
            assert f"method.{group}.{key}" in str(raw[source]), (group, key)
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.ctx.n_ctx) == (128, 100, 4)
    given = make_cfg(["dataset=oxford_pets", "method=kgcoop", "data.batch_size=8", "ctx.n_ctx=2"], tmp_path)
    assert (given.data.batch_size, given.ctx.n_ctx, given.method.module.n_ctx) == (8, 2, 2)


def test_epochs_by_shots(tmp_path: Path) -> None:
    table = "+method.trainer.epochs_by_shots={1: 100, 2: 100, 4: 100, 8: 200, 16: 200}"
    for shots, epochs in ((1, 100), (8, 200)):
        cfg = make_cfg(["dataset=oxford_pets", f"shots={shots}", table], tmp_path)
        assert cfg.trainer.max_epochs == epochs
    cfg = make_cfg(["dataset=oxford_pets", "shots=2", "+method.trainer.epochs_by_shots={1: 100}"], tmp_path)
    with pytest.raises(Exception, match=r"epochs_by_shots has no epochs for shots=2 \(it has \[1\]\)"):
        _ = cfg.trainer.max_epochs


def test_a_recipe_key_that_nothing_reads_is_refused(tmp_path: Path) -> None:
    cfg = make_cfg(["dataset=oxford_pets", "+method.data.num_workers=2"], tmp_path)
    with pytest.raises(ValueError, match=r"method.data.num_workers: a method's recipe sets data.batch_size"):
        check_recipe_places(cfg.method)


FOLDERS_BEFORE = Path(__file__).parent / "fixtures" / "fingerprints_before_recipes.json"


def test_run_folders_from_before_the_move_continue(tmp_path: Path) -> None:
    """A folder's fingerprint written before the recipes moved (the optimiser's arguments under
    method.module) is the same configuration today; another lr is still another configuration."""
    from src.run.resume import differences, fingerprint, upgrade_fingerprint

    for name, folder in json.loads(FOLDERS_BEFORE.read_text()).items():
        current = fingerprint(make_cfg(folder["overrides"], tmp_path))
        assert differences(upgrade_fingerprint(folder["config"], current), current) == "", name
    coop = json.loads(FOLDERS_BEFORE.read_text())["coop"]
    current = fingerprint(make_cfg([*coop["overrides"], "method.optimizer.lr=0.001"], tmp_path))
    changed = differences(upgrade_fingerprint(coop["config"], current), current)
    assert changed == "method.optimizer.lr: 0.002 -> 0.001"


def test_the_data_settings_resolve_in_place(tmp_path: Path) -> None:
    """`python -m src.train ... --cfg job --resolve` resolves the config in place, where a default
    given as a bare list inside an interpolation is refused ("Value 'list' is not a supported
    primitive type"): the crop scale's default, the method's and the dataset's all resolve."""
    for args, scale in (
        (["dataset=oxford_pets"], [0.08, 1.0]),
        (["dataset=oxford_pets", "method=mmrl"], [0.5, 1.0]),
        (["dataset=digits"], [0.5, 1.0]),
    ):
        data = make_cfg(args, tmp_path).data
        OmegaConf.resolve(data)
        assert OmegaConf.to_container(data)["crop_scale"] == scale, args

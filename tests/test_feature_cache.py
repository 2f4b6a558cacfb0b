"""The feature cache: computed once, reused by later runs, never stale, exact, written atomically."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from src.data.datamodule import FewShotDataModule
from src.data.datasets.oxford_pets import OxfordPets
from src.data.feature_cache import FeatureCache, ImageEncoder, SeededViews, feature_key
from src.data.samples import Sample
from src.data.transforms import train_transform
from src.methods.coop import CoOp
from src.models.clip import FrozenCLIP, weights_identity
from src.run.backbone import image_encoder
from src.run.training import train
from tests.conftest import make_cfg
from tests.miniature import make_oxford_pets


@pytest.fixture
def encoded(monkeypatch) -> list[int]:
    """The number of images each call of the image encoder encodes."""
    calls: list[int] = []
    encode = FrozenCLIP.encode_image

    def counting(self, images):
        calls.append(len(images))
        return encode(self, images)

    monkeypatch.setattr(FrozenCLIP, "encode_image", counting)
    return calls


def run(overrides, tmp_path, name, *extra):
    return train(make_cfg(["dataset=oxford_pets", "shots=2", *overrides, *extra], tmp_path / name))


def test_a_sweep_encodes_each_test_image_once_and_changed_keys_recompute(tiny_overrides, tmp_path, encoded):
    overrides = [*tiny_overrides, f"paths.cache_dir={tmp_path / 'cache'}"]
    first = run(overrides, tmp_path, "zs1", "method=zeroshot")
    assert sum(encoded) == first["num_test"] == 16
    encoded.clear()
    second = run(overrides, tmp_path, "zs2", "method=zeroshot")
    assert encoded == [] and second["test_acc"] == first["test_acc"]
    # a CoOp run of the same sweep encodes its training images only: the test comes from the cache
    coop = run(overrides, tmp_path, "coop", "trainer.max_epochs=2")
    assert sum(encoded) == 2 * coop["num_train"]
    assert len(list((tmp_path / "cache" / "features" / "oxford_pets").glob("test-*.safetensors"))) == 1
    encoded.clear()
    run(overrides, tmp_path, "seed2", "method=zeroshot", "seed=2")  # other random weights (tiny model)
    assert sum(encoded) == 16
    encoded.clear()
    run(overrides, tmp_path, "base", "method=zeroshot", "dataset.subsample=base")  # another image list
    assert sum(encoded) == 8


def encoder(clip: FrozenCLIP, precision: str) -> ImageEncoder:
    """`clip`'s image encoder as a run hands it to the data module (src/run/backbone.py)."""
    return ImageEncoder(clip.encode_image, weights_identity(clip), clip.image_size, precision, nullcontext)


def test_changed_key_parts_give_other_files(tmp_path):
    clip = FrozenCLIP("coop-tiny", None)
    items = [Sample("/a.jpg", 0, "cat"), Sample("/b.jpg", 1, "dog")]
    cache = FeatureCache(tmp_path)
    key = feature_key(encoder(clip, "32-true"), "pets", "test", items, "Resize(32)")
    paths = {
        cache.path(key),
        cache.path(feature_key(encoder(clip, "32-true"), "pets", "test", items[::-1], "Resize(32)")),
        cache.path(feature_key(encoder(clip, "32-true"), "pets", "test", items, "Resize(64)")),
        cache.path(feature_key(encoder(clip, "32-true"), "pets", "val", items, "Resize(32)")),
        cache.path(feature_key(encoder(clip, "bf16-mixed"), "pets", "test", items, "Resize(32)")),
    }
    assert len(paths) == 5
    clip.image_size = 64  # another input size
    assert cache.path(feature_key(encoder(clip, "32-true"), "pets", "test", items, "Resize(32)")) not in paths


def test_weights_identity_follows_the_weights(tmp_path):
    torch.manual_seed(0)
    a = FrozenCLIP("coop-tiny", None)
    torch.manual_seed(0)
    b = FrozenCLIP("coop-tiny", None)
    torch.manual_seed(1)
    c = FrozenCLIP("coop-tiny", None)
    assert weights_identity(a) == weights_identity(b) != weights_identity(c)
    assert weights_identity(SimpleNamespace(name="RN50", pretrained="openai")) == "RN50:openai"
    weights = tmp_path / "RN50.pt"
    weights.write_bytes(b"x" * 100)
    local = SimpleNamespace(name="RN50", pretrained=str(weights))
    before = weights_identity(local)
    weights.write_bytes(b"y" * 100)
    assert weights_identity(local) != before


def test_cached_features_give_the_same_test_as_on_the_fly(tiny_clip, data_dir, tmp_path):
    def datamodule(**kwargs) -> FewShotDataModule:
        reader = OxfordPets(data_dir / "oxford_pets")
        return FewShotDataModule(reader, shots=2, seed=1, image_size=32, num_workers=0, **kwargs)

    cached, direct = datamodule(cache_dir=tmp_path), datamodule(cache_features=False)
    torch.manual_seed(0)
    module = CoOp(tiny_clip, cached.classnames, n_ctx=4)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    cached.use_encoder(image_encoder(tiny_clip, trainer))  # what a run hands over
    assert trainer.test(module, datamodule=cached) == trainer.test(module, datamodule=direct)
    features, labels = cached.image_features("test")
    images, image_labels = next(iter(direct.test_dataloader()))
    assert torch.equal(labels, image_labels)
    with torch.no_grad():
        assert torch.equal(features, tiny_clip.encode_image(images))
        assert torch.equal(module(features), module(images))


def test_store_load_and_unreadable_files(tmp_path):
    cache = FeatureCache(tmp_path)
    key = {"dataset": "pets", "split": "test", "images": "2:abc"}
    features = torch.randn(2, 8)
    computed = []

    def compute():
        computed.append(1)
        return features

    assert torch.equal(cache.get(key, compute), features) and len(computed) == 1
    assert torch.equal(cache.get(key, compute), features) and len(computed) == 1
    path = cache.path(key)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    path.write_bytes(path.read_bytes()[:20])  # a file cut short (a disk full, a copy interrupted)
    assert torch.equal(cache.get(key, compute), features) and len(computed) == 2
    assert torch.equal(cache.load(key), features)


def test_a_damaged_feature_file_is_computed_again(tmp_path, caplog):
    """A file whose header reads but whose tensor bytes were damaged: its checksum tells."""
    cache = FeatureCache(tmp_path)
    key = {"dataset": "pets", "split": "test", "images": "2:abc"}
    features = torch.randn(2, 8)
    cache.save(key, features, "stamp")
    path = cache.path(key)
    damaged = bytearray(path.read_bytes())
    damaged[-5] ^= 0xFF  # a byte of the last feature
    path.write_bytes(bytes(damaged))
    assert cache.load(key, "stamp") is None
    assert "damaged feature file" in caplog.text and str(path) in caplog.text
    recomputed = cache.get(key, lambda: features, "stamp")
    assert torch.equal(recomputed, features) and torch.equal(cache.load(key, "stamp"), features)


def test_images_replaced_in_place_are_encoded_again(tiny_clip, tmp_path, caplog):
    """Same paths, other pixels (a re-exported data set): the cached features are not used; the
    test accuracy is the new images'."""
    root = make_oxford_pets(tmp_path / "data")
    datamodule = FewShotDataModule(
        OxfordPets(root), shots=2, seed=1, image_size=32, num_workers=0, cache_dir=tmp_path / "cache"
    )
    datamodule.setup("test")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    datamodule.use_encoder(image_encoder(tiny_clip, trainer))
    before, _ = datamodule.image_features("test")
    first = Path(datamodule.test_items[0].path)
    Image.fromarray(np.full((40, 48, 3), 200, dtype=np.uint8)).save(first)  # other pixels, same name
    after, _ = datamodule.image_features("test")
    assert "changed since their features were cached" in caplog.text
    assert not torch.equal(after[0], before[0]) and torch.equal(after[1:], before[1:])
    direct = FewShotDataModule(OxfordPets(root), shots=2, seed=1, image_size=32, num_workers=0)
    direct.setup("test")
    images, _ = next(iter(direct.test_dataloader()))
    with torch.no_grad():
        assert torch.equal(after[: len(images)], tiny_clip.encode_image(images))


def test_train_views_are_seeded_and_read_back_from_the_cache(tiny_overrides, tmp_path, encoded):
    items = []
    for i in range(3):
        path = tmp_path / f"noise{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        items.append(Sample(str(path), i, "noise"))
    views = SeededViews(items, train_transform(32), views=2, seed=1)
    again = SeededViews(items, train_transform(32), views=2, seed=1)
    assert torch.equal(views[4][0], again[4][0])  # view 1 of image 1, whatever was drawn before
    assert not torch.equal(views[1][0], views[4][0])  # two views of one image differ

    overrides = [*tiny_overrides, f"paths.cache_dir={tmp_path / 'cache'}", "data.train_views=3"]
    first = run(overrides, tmp_path, "a", "trainer.max_epochs=1")
    assert sum(encoded) == 3 * first["num_train"] + first["num_test"]
    encoded.clear()
    second = run(overrides, tmp_path, "b", "trainer.max_epochs=1")
    assert encoded == [] and second["test_acc"] == first["test_acc"] and second["train_views"] == 3


def test_the_default_cache_is_per_user_wherever_a_run_starts(monkeypatch, tmp_path):
    """Two sweeps launched from two folders share one cache; $COOP_CACHE still chooses another."""
    monkeypatch.delenv("COOP_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        cfg = make_cfg(["dataset=oxford_pets"], tmp_path / "run")
        assert cfg.paths.cache_dir == cfg.data.cache_dir == str(tmp_path / "home" / ".cache" / "coop")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = make_cfg(["dataset=oxford_pets"], tmp_path / "run")
    assert cfg.paths.cache_dir == str(tmp_path / "xdg" / "coop")
    monkeypatch.setenv("COOP_CACHE", str(tmp_path / "shared"))
    assert make_cfg(["dataset=oxford_pets"], tmp_path / "run").data.cache_dir == str(tmp_path / "shared")

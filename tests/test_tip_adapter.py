"""Tip-Adapter and Tip-Adapter-F: the cache model's logits, the fine-tuned keys, and hyper-parameters
chosen on the few-shot validation set before the test split is first read."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.data.datamodule import FewShotDataModule
from src.methods.tip_adapter import TipAdapter
from src.methods.zeroshot import ZeroShotCLIP
from src.run.config import compose_config
from src.run.evaluation import evaluate
from src.run.training import train
from tests.conftest import make_cfg

NAMES = ["abyssinian", "american bulldog", "basset hound", "bengal"]
TEMPLATES = ["a photo of a {}."]


def cache_of(tiny_clip, finetune: bool = False) -> tuple[TipAdapter, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    features = torch.randn(12, tiny_clip.model.visual.output_dim)
    labels = torch.arange(12) % 4
    module = TipAdapter(tiny_clip, NAMES, TEMPLATES, finetune=finetune)
    module.set_cache(features, F.one_hot(labels, 4))
    return module, features, labels


def test_without_the_cache_it_is_zero_shot_clip(tiny_clip):
    module, features, _ = cache_of(tiny_clip)
    zero_shot = ZeroShotCLIP(tiny_clip, NAMES, TEMPLATES)
    torch.testing.assert_close(module.logits(features, alpha=0.0, beta=5.0), zero_shot.logits(features))


def test_the_cache_classifies_its_own_images_for_large_beta(tiny_clip):
    module, features, labels = cache_of(tiny_clip)
    assert (module.logits(features, alpha=0.0, beta=1.0).argmax(-1) != labels).any()  # zero-shot errs
    logits = module.logits(features, alpha=100.0, beta=1000.0)
    assert torch.equal(logits.argmax(-1), labels)
    # each image's own key gives exp(0) = 1, the others vanish: alpha times its one-hot label
    cache = logits - module.logits(features, alpha=0.0, beta=1000.0)
    torch.testing.assert_close(cache, 100.0 * F.one_hot(labels, 4).float(), atol=0.1, rtol=0)


def test_tip_adapter_f_trains_the_keys_only(tiny_clip):
    module, _, _ = cache_of(tiny_clip, finetune=True)
    assert [name for name, p in module.named_parameters() if p.requires_grad] == ["keys"]
    frozen, _, _ = cache_of(tiny_clip, finetune=False)
    assert not [name for name, p in frozen.named_parameters() if p.requires_grad]


@pytest.fixture
def access_log(monkeypatch):
    """Records, in order, the reads of each split's features or images and the end of each search."""
    events: list[str] = []
    image_features = FewShotDataModule.image_features
    test_dataloader = FewShotDataModule.test_dataloader
    search = TipAdapter.search_hyperparameters

    def spy_features(self, split, views=0):
        events.append(split)
        return image_features(self, split, views)

    def spy_test_loader(self):
        events.append("test")
        return test_dataloader(self)

    def spy_search(self):
        search(self)
        events.append("search done")

    monkeypatch.setattr(FewShotDataModule, "image_features", spy_features)
    monkeypatch.setattr(FewShotDataModule, "test_dataloader", spy_test_loader)
    monkeypatch.setattr(TipAdapter, "search_hyperparameters", spy_search)
    return events


def test_hyperparameters_are_chosen_before_the_test_split_is_read(
    access_log, tiny_overrides, eval_overrides, tmp_path
):
    runs = {}
    for method, epochs in (("tip_adapter", 0), ("tip_adapter_f", 2)):
        access_log.clear()
        overrides = [
            f"method={method}",
            "method.module.augment_views=2",
            "method.module.search_steps=[20,10]",
        ]
        if epochs:
            overrides.append(f"trainer.max_epochs={epochs}")
        cfg = make_cfg(["dataset=oxford_pets", "shots=4", *overrides, *tiny_overrides], tmp_path / method)
        runs[method] = train(cfg)
        first_test = access_log.index("test")
        assert access_log.index("search done") < first_test and "test" not in access_log[:first_test]
        assert access_log.index("val") < access_log.index("search done")
        assert runs[method]["method"] == method and runs[method]["val_acc"] is not None
    assert runs["tip_adapter"]["epochs"] == 0 and runs["tip_adapter_f"]["best_epoch"] in (0, 1)
    # the fine-tuned keys start from Tip-Adapter's cache (same seed, same images) and move
    plain = torch.load(tmp_path / "tip_adapter" / "prompt.pt", weights_only=True)
    tuned = torch.load(tmp_path / "tip_adapter_f" / "prompt.pt", weights_only=True)
    assert torch.equal(plain["labels"], tuned["labels"]) and not torch.equal(plain["keys"], tuned["keys"])

    # the saved cache tests the same again through src.eval
    args = [
        f"ckpt={tmp_path / 'tip_adapter' / 'prompt.pt'}",
        "dataset=oxford_pets",
        *eval_overrides,
    ]
    again = evaluate(compose_config("eval", args, tmp_path / "eval"))
    assert again["test_acc"] == runs["tip_adapter"]["test_acc"] and again["method"] == "tip_adapter"

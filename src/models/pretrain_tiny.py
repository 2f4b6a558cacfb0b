"""Pre-trains the tiny CLIP shipped with the project, contrastively, on captioned digit scans.

python -m src.models.pretrain_tiny            # or: make tiny-clip (a few minutes on 2 CPU cores)

open_clip does the work: the model comes from a JSON config (`create_model`), the loss is its
`ClipLoss`, the captions go through its tokenizer. The images are the pre-training half of the
`digits` dataset (src/data/datasets/digits.py) in its `scan` look, black ink on white paper: never
the half that prompts are learned and tested on, and never the `notepad` look (blue ink on yellow
paper) that the dataset shows them in. Each caption is one of many phrasings; the digit is written
as a numeral ("7") in most of them and as the word ("seven", the class names of the dataset) in a few.
Deterministic: seeded, deterministic algorithms, one thread.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import open_clip
import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.loss import ClipLoss
from PIL import Image
from safetensors.torch import save
from torchvision import transforms as T

from src.common.files import atomic_write
from src.data.datasets.digits import CLASSNAMES, PRETRAINING_LOOK, read_digits
from src.models.clip import SHIPPED_DIR, register_project_configs

log = logging.getLogger(__name__)

ARCHITECTURE = "coop-tiny-narrow"  # a 32-wide text tower: the 49,408-word embedding table stays small
WEIGHTS = SHIPPED_DIR / "coop-tiny-digits.safetensors"
WORD_FRACTION = 0.15  # of the captions that write the digit as a word, not a numeral

# {}: the digit, as a numeral or a word.
CAPTIONS = [
    "{}",
    "the number {}",
    "the digit {}",
    "a handwritten {}",
    "handwritten {}",
    "a handwritten digit: {}",
    "a scan of a handwritten {}",
    "a scanned {}",
    "a small image of the numeral {}",
    "a blurry {}",
    "a low resolution picture of a {}",
    "the figure {}, written by hand",
    "someone wrote the number {}",
    "a pixelated {}",
    "a {} drawn with a pen",
    "ink on paper: {}",
    "a black and white picture of a {}",
    "this is a {}",
    "this digit is {}",
]


def caption(label: int, rng: random.Random, word_fraction: float = WORD_FRACTION) -> str:
    digit = CLASSNAMES[label] if rng.random() < word_fraction else str(label)
    return rng.choice(CAPTIONS).format(digit)


def augmentation(size: int) -> T.Compose:
    # Large crops only: a 32 px scan of an 8x8 digit keeps its digit in them (as for the dataset's prompts).
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
        ]
    )


@contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic algorithms on one thread (results do not depend on the machine's thread count),
    then torch's settings as they were."""
    threads, algorithms = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(algorithms)
        torch.set_num_threads(threads)


@deterministic()
def pretrain(
    root: Path,
    out: Path = WEIGHTS,
    epochs: int = 50,
    batch_size: int = 64,
    lr: float = 2e-3,
    word_fraction: float = WORD_FRACTION,
    seed: int = 0,
) -> dict[str, float]:
    """Trains the model on (image, caption) pairs of the pre-training half; writes its weights in
    fp16 (a safetensors state dict, loaded by `model.pretrained=<file>` as any open_clip checkpoint)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    register_project_configs()
    model = open_clip.create_model(ARCHITECTURE, device="cpu")
    tokenizer = open_clip.get_tokenizer(ARCHITECTURE)
    _, items = read_digits(root, PRETRAINING_LOOK)
    images = []
    for item in items:
        with Image.open(item.path) as image:
            images.append(image.convert("RGB"))
    augment = augmentation(model.visual.image_size[0])
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=True)
    steps_per_epoch = len(items) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = list(range(len(items)))
        rng.shuffle(order)
        total = 0.0
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            x = torch.stack([augment(images[i]) for i in batch])
            text = tokenizer([caption(items[i].label, rng, word_fraction) for i in batch])
            image_features, text_features, logit_scale = model(x, text)
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        log.info("epoch %d: loss %.3f (%.0f s)", epoch, total / steps_per_epoch, time.perf_counter() - start)
    state = {key: value.detach().half().contiguous() for key, value in model.state_dict().items()}
    atomic_write(out, lambda f: f.write(save(state)))
    return {"loss": total / steps_per_epoch, "time_s": time.perf_counter() - start}


def main() -> None:
    cache = Path(os.environ.get("COOP_CACHE", "outputs/.cache"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=cache / "digits", help="digit PNGs (made if missing)")
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--word-fraction", type=float, default=WORD_FRACTION)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = pretrain(args.data, args.out, epochs=args.epochs, word_fraction=args.word_fraction)
    log.info("wrote %s (final loss %.3f, %.0f s)", args.out, summary["loss"], summary["time_s"])


if __name__ == "__main__":
    main()

"""The frozen CLIP backbone: an open_clip model made from a name and a pretrained tag."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import open_clip
import torch
from torch import nn

from src.models.text_encoder import TextEncoder, TextPath
from src.models.weights import WeightsUnavailableError, check_weights

log = logging.getLogger(__name__)

# Architectures shipped with the project (e.g. `coop-tiny`) are open_clip JSON configs; a user adds
# one by dropping a JSON file here, no code needed.
CONFIG_DIR = Path(str(files("src.models") / "configs"))
# Weights made by the project itself (`make tiny-clip`), shipped with the package.
SHIPPED_DIR = Path(str(files("src.models") / "shipped"))


def register_project_configs() -> None:
    if not any(name in open_clip.list_models() for name in _project_models()):
        open_clip.add_model_config(CONFIG_DIR)


def shipped_weights(filename: str) -> str:
    """The path of a weights file in src/models/shipped/ (`model.pretrained=${shipped_weights:<file>}`)."""
    return str(SHIPPED_DIR / filename)


def _project_models() -> list[str]:
    return [p.stem for p in CONFIG_DIR.glob("*.json")]


def check_architecture(name: str) -> None:
    register_project_configs()
    if name not in open_clip.list_models():
        raise ValueError(
            f"model.name={name!r} is not an open_clip architecture; pick one of "
            f"open_clip.list_models() (e.g. RN50-quickgelu, ViT-B-32) or {_project_models()}"
        )


@dataclass(frozen=True)
class Architecture:
    """What a method may check of a backbone before it is built (`Method.check_config`), read from
    open_clip's JSON config of the architecture: no weights are loaded.

    `image_encoder` is the kind open_clip builds from the config: "vit" (its VisionTransformer, a
    sequence of tokens), "resnet" (its ModifiedResNet) or "timm" (a timm model). Block counts are
    None where the config does not give them (a timm image encoder, a Hugging Face text encoder).
    """

    name: str
    image_encoder: str
    image_blocks: int | None
    text_blocks: int | None

    @classmethod
    def of(cls, name: str) -> Architecture:
        """The architecture `model.name=<name>` (ValueError naming the option if unknown)."""
        check_architecture(name)
        config = open_clip.get_model_config(name)
        vision, text = config["vision_cfg"], config["text_cfg"]
        layers = vision.get("layers")
        if vision.get("timm_model_name"):
            kind = "timm"
        else:
            kind = "resnet" if isinstance(layers, (list, tuple)) else "vit"
        return cls(
            name=name,
            image_encoder=kind,
            image_blocks=layers if kind == "vit" else None,
            text_blocks=None if text.get("hf_model_name") else text.get("layers"),
        )


class FrozenCLIP(nn.Module):
    """An open_clip model whose weights never train and which stays in eval mode: what every method
    is built on (docs/writing_a_method.md).

    `pretrained` is an open_clip tag (e.g. "openai"), a local weights file, or None for random
    weights (the tiny test architecture). `text_path` picks the text encoder's computation
    (src/models/text_encoder.py); `text_fast=false`, its former switch, still means "reference".

    What a method uses: `encode_image` / `image_features` (images, or cached features, to image
    features), `encode_text` (token ids to text features), `text` (prompt embeddings to text
    features, the exact fast path), `tokenize`, `token_embedding`, `logit_scale`, and the sizes
    `embed_dim`, `text_width`, `context_length`, `image_size`; `device` and `dtype` say where and
    in which precision its weights are.
    """

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        text_path: TextPath = "auto",
        text_chunk: int | None = None,
        text_fast: bool | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_architecture(name)
        self.name = name
        self.pretrained = pretrained or None
        check_weights(name, self.pretrained, cache_dir)  # in seconds, where a download would wait
        # Random weights are drawn from torch's generator: the seed it was last seeded with (a run's
        # seed, `pl.seed_everything`) rebuilds them, and a prompt file records it.
        self.seed = torch.initial_seed() if self.pretrained is None else None
        try:
            self.model = open_clip.create_model(
                name, pretrained=self.pretrained, cache_dir=cache_dir, device="cpu"
            )
        except RuntimeError as err:
            raise WeightsUnavailableError(
                f"cannot load CLIP weights model.pretrained={pretrained!r} for model.name={name!r} "
                f"({err}); without network pass a local file with model.pretrained=<file>, "
                "or use model=tiny for a random-weight test model"
            ) from err
        self.model.requires_grad_(False)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        if text_fast is False:
            text_path = "reference"
        self.text = TextEncoder(self.model, path=text_path, chunk=text_chunk)
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    def train(self, mode: bool = True) -> FrozenCLIP:
        # Frozen means eval mode too: RN50's BatchNorm statistics must never update.
        return super().train(False)

    @property
    def token_embedding(self) -> nn.Embedding:
        """The text encoder's token embedding table [vocabulary, `text_width`]: token ids to the
        vectors a prompt is made of (a learned context replaces some of them)."""
        return self.text.token_embedding

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's learned temperature, exponentiated (about 100 for the released weights): logits
        are `logit_scale * cos(image, text)`."""
        return self.model.logit_scale.exp()

    @property
    def embed_dim(self) -> int:
        """The width of the joint image-text space: image and text features are [.., embed_dim]."""
        return int(self.model.text_projection.shape[-1])

    @property
    def text_width(self) -> int:
        """The width of the text encoder's tokens: a prompt embedding is [.., length, text_width]."""
        return int(self.token_embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        """How many tokens a prompt can hold (77 for CLIP), start and end tokens included."""
        return self.text.context_length

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' precision (float32: mixed precision comes from the trainer's autocast)."""
        return self.token_embedding.weight.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image features [b, embed_dim] of a batch of images [b, 3, image_size, image_size]."""
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text features [n, embed_dim] of token ids [n, context_length] (`tokenize`'s): the
        reference computation, all 77 positions (`text` computes the same from prompt embeddings,
        faster)."""
        return self.model.encode_text(tokens)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a batch of images [b, 3, h, w], or the batch itself when it already holds
        image features [b, d] (the data module's batches when features are cached)."""
        return images if images.ndim == 2 else self.encode_image(images)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [len(texts), context_length] of CLIP's tokenizer (start, words, end, padding 0)."""
        return self.tokenizer(texts)


HASHED_WEIGHTS_BYTES = 4 << 20  # a local weights file is identified by its size, mtime and first MiBs


def weights_identity(clip: FrozenCLIP) -> str:
    """What identifies the image encoder's weights: the open_clip tag, a local file's size, mtime
    and first bytes, or, for random weights (which depend on the seed), the weights themselves."""
    if clip.pretrained is None:
        digest = hashlib.sha256()
        for name, tensor in sorted(clip.model.visual.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return f"{clip.name}:random:{digest.hexdigest()}"
    path = Path(clip.pretrained)
    if path.is_file():
        stat = path.stat()
        with path.open("rb") as f:
            head = hashlib.sha256(f.read(HASHED_WEIGHTS_BYTES)).hexdigest()
        return f"{clip.name}:file:{stat.st_size}:{stat.st_mtime_ns}:{head}"
    return f"{clip.name}:{clip.pretrained}"

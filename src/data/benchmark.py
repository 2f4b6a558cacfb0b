"""The paper's groups of datasets: which are trained on and which are only transferred to."""

from __future__ import annotations

# Test sets of the domain generalisation study: a context trained on ImageNet, tested on these.
DOMAIN_GENERALIZATION = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
# Targets of cross-dataset transfer from ImageNet.
CROSS_DATASET = (
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)
# The 11 datasets of the few-shot and base-to-new studies.
BASE_TO_NEW = ("imagenet", *CROSS_DATASET)

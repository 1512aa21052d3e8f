"""Real models, real data and the evaluation harness (offline; see DATA.md for where each comes from).

>>> from lowbit import zoo                                                   # doctest: +SKIP
>>> model = zoo.efficientnet_lite0()                                         # doctest: +SKIP
>>> data = zoo.loader(zoo.imagenet_samples(), batch_size=50)                 # doctest: +SKIP
>>> zoo.evaluate_classifier(model, data).top1                                # doctest: +SKIP
0.876
"""

from __future__ import annotations

from .data import (
    LabelledImages,
    SentencePairs,
    calibration_batches,
    every_fourth_split,
    fashion_mnist,
    foolbox_images,
    halves_split,
    image_folder,
    imagenet_eval_and_calibration,
    imagenet_samples,
    loader,
    stsb,
    tensor_file,
)
from .evaluate import EvalResult, compare, compare_sts, evaluate_classifier, evaluate_sts
from .metrics import mean_cosine, mean_kl, model_size_bytes, spearman, top1_accuracy
from .models import (
    SentenceEncoder,
    efficientnet_lite0,
    fashion_cnn,
    fashion_resnet,
    minilm,
    torchvision_model,
)
from .transforms import EFFICIENTNET_LITE, FASHION, IMAGENET, MNIST, Preprocess

__all__ = [
    "efficientnet_lite0", "fashion_cnn", "fashion_resnet", "minilm", "SentenceEncoder", "torchvision_model",
    "imagenet_samples", "foolbox_images", "image_folder", "fashion_mnist", "tensor_file", "stsb",
    "LabelledImages", "SentencePairs", "loader", "calibration_batches", "imagenet_eval_and_calibration",
    "every_fourth_split",
    "halves_split",
    "Preprocess", "EFFICIENTNET_LITE", "IMAGENET", "FASHION", "MNIST",
    "EvalResult", "evaluate_classifier", "compare", "evaluate_sts", "compare_sts",
    "top1_accuracy", "mean_kl", "mean_cosine", "spearman", "model_size_bytes",
]

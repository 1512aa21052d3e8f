"""Train the Fashion-MNIST benchmark models once and cache their weights.

    python -m lowbit.zoo.train_fashion                 # both models, 3 epochs, into the user cache
    python -m lowbit.zoo.train_fashion --models fashion_cnn --epochs 1 --force

Weights go to ``<cache>/fashion/<name>.safetensors`` (``$LOWBIT_CACHE`` or ``~/.cache/lowbit``), with the
training settings and the test top-1 in the file's metadata; they are never part of the repository.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .data import fashion_mnist, loader
from .evaluate import evaluate_classifier
from .fashion_nets import ARCHITECTURES
from .paths import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Adam with a cosine learning-rate decay to zero over all steps; no augmentation."""

    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    name: str
    path: Path
    test_top1: float
    train_seconds: float
    config: TrainConfig


def weights_path(name: str) -> Path:
    """Where the cached weights of ``name`` live (the file may not exist yet)."""
    return cache_dir() / "fashion" / f"{name}.safetensors"


def train_fashion(name: str, config: TrainConfig = TrainConfig(), save: bool = True,
                  progress: bool = True) -> tuple[nn.Module, TrainResult]:
    """Train ``name`` (``"fashion_cnn"`` or ``"fashion_resnet"``) on the 60 000 training images, measure
    test top-1 on the 10 000 test images, and (``save``) write the weights to :func:`weights_path`.

    Returns the trained model in eval mode and a :class:`TrainResult`.
    """
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown model {name!r}; choose from {sorted(ARCHITECTURES)}")
    torch.manual_seed(config.seed)
    model = ARCHITECTURES[name]()
    train = loader(fashion_mnist("train"), config.batch_size, shuffle=True, seed=config.seed)
    test = loader(fashion_mnist("test"), 500)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * len(train))
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        total, n = 0.0, 0
        for x, y in train:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            n += len(y)
        log.info("%s epoch %d/%d: train loss %.4f (%.0f s)", name, epoch + 1, config.epochs, total / n,
                 time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    model.eval()
    top1 = evaluate_classifier(model, test, progress=progress).top1
    path = weights_path(name)
    if save:
        from safetensors.torch import save_file

        from ..export._io import write_replacing

        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: str(v) for k, v in asdict(config).items()}
        meta.update(test_top1=f"{top1:.4f}", train_seconds=f"{seconds:.1f}", architecture=name)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        write_replacing(path, lambda tmp: save_file(state, str(tmp), metadata=meta))  # the umask's mode, not 0600
        log.info("%s: test top-1 %.4f, %.0f s; saved %s", name, top1, seconds, path)
    return model, TrainResult(name, path, top1, seconds, config)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit.zoo.train_fashion", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=sorted(ARCHITECTURES), choices=sorted(ARCHITECTURES))
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--force", action="store_true", help="retrain even when cached weights exist")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.models:
        if weights_path(name).is_file() and not args.force:
            log.info("%s: cached at %s (use --force to retrain)", name, weights_path(name))
            continue
        train_fashion(name, TrainConfig(epochs=args.epochs, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

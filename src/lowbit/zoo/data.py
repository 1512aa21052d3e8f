"""Real, offline evaluation and calibration data: ImageNet samples, foolbox's labelled images,
Fashion-MNIST, STS-B, any image folder, and ``.npy`` / ``.npz`` tensors.

Every image dataset yields ``(x, label)`` with ``x`` a float32 ``(C, H, W)`` tensor and ``label`` an int;
:func:`loader` batches them, :func:`calibration_batches` turns a dataset into the list of input tensors
that calibration takes. Nothing here downloads anything: see ``/work/shared/DATA.md`` for where each
set comes from, and every loader says how to get its data when it is missing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import ConfigError, DataNotFoundError, ModelFileError
from .idx import read_idx
from .paths import package_dir, shared_data_dir
from .transforms import EFFICIENTNET_LITE, FASHION, FASHION_MEAN, FASHION_STD, Preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


class LabelledImages(Dataset):
    """Image files with integer labels, preprocessed lazily: ``ds[i] = (preprocess(files[i]), labels[i])``."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], preprocess: Preprocess) -> None:
        if len(files) != len(labels):
            raise ConfigError(f"{len(files)} files but {len(labels)} labels")
        self.files = [Path(f) for f in files]
        self.labels = [int(y) for y in labels]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.preprocess(self.files[i]), self.labels[i]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def imagenet_samples(path: str | os.PathLike | None = None,
                     preprocess: Preprocess = EFFICIENTNET_LITE) -> LabelledImages:
    """The 1000 ImageNet images, one per class; sorted file order is the class index 0..999.

    Folder: ``path``, else ``$LOWBIT_IMAGENET_SAMPLES``, else ``../shared/data/imagenet-samples``.
    Likely training-split images: use them for float-vs-quantized deltas, not absolute accuracy.
    """
    folder = shared_data_dir("imagenet-samples", path, "LOWBIT_IMAGENET_SAMPLES")
    files = _images_in(folder)
    if not files:
        raise DataNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return LabelledImages(files, range(len(files)), preprocess)


FOOLBOX_KINDS = ("imagenet", "cifar10", "cifar100", "mnist", "fashionMNIST")


def foolbox_images(kind: str = "imagenet", preprocess: Preprocess | None = None) -> LabelledImages:
    """foolbox's 20 labelled sample images of one data set (label in the name: ``imagenet_03_990.jpg``).

    Default preprocessing: :data:`EFFICIENTNET_LITE` for ImageNet, :data:`FASHION` for (Fashion-)MNIST,
    [0, 1] RGB for CIFAR. The 20 ImageNet images are disjoint from :func:`imagenet_samples`: a small
    calibration set. Needs ``pip install foolbox`` (only its data folder is used).
    """
    if kind not in FOOLBOX_KINDS:
        raise ConfigError(f"kind must be one of {FOOLBOX_KINDS}, got {kind!r}")
    folder = package_dir("foolbox", "foolbox_images") / "data"
    files = sorted(p for p in folder.glob(f"{kind}_*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataNotFoundError(f"no {kind}_* images in {folder}; reinstall foolbox (`pip install foolbox`)")
    labels = [int(p.stem.rsplit("_", 1)[1]) for p in files]
    if preprocess is None:
        preprocess = {"imagenet": EFFICIENTNET_LITE, "mnist": FASHION, "fashionMNIST": FASHION}.get(
            kind, Preprocess(resize=None, crop=None, mean=(0.0,) * 3, std=(1.0,) * 3))
    return LabelledImages(files, labels, preprocess)


def image_folder(root: str | os.PathLike, preprocess: Preprocess = EFFICIENTNET_LITE) -> LabelledImages:
    """ImageNet layout: one subfolder per class; the sorted subfolder names give class indices 0..K-1.

    Attribute ``classes`` (list of folder names) is set on the returned dataset.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataNotFoundError(f"{root} has no class subfolders; expected <root>/<class>/<image>.jpg")
    files, labels = [], []
    for k, name in enumerate(classes):
        imgs = _images_in(root / name)
        files += imgs
        labels += [k] * len(imgs)
    if not files:
        raise DataNotFoundError(f"the class folders under {root} contain no images ({', '.join(IMAGE_SUFFIXES)})")
    ds = LabelledImages(files, labels, preprocess)
    ds.classes = classes
    return ds


def fashion_mnist(split: str = "test", root: str | os.PathLike | None = None,
                  normalize: bool = True) -> TensorDataset:
    """Fashion-MNIST as ``TensorDataset(x, y)``: ``x`` float32 ``(N, 1, 28, 28)``, ``y`` int64 ``(N,)``.

    ``x = (pixel / 255 - 0.2860) / 0.3530`` when ``normalize`` (else ``pixel / 255``). ``split`` is
    ``"train"`` (60 000) or ``"test"`` (10 000). Files: ``root``, else ``$LOWBIT_FASHION_MNIST``, else the
    Debian package's ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root or os.environ.get("LOWBIT_FASHION_MNIST") or FASHION_MNIST_DIR)
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        cands = [folder / f"{prefix}-{kind}-ubyte{ext}" for ext in (".gz", "")]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise DataNotFoundError(
                f"Fashion-MNIST file {cands[0].name} not found in {folder}. On Debian/Ubuntu run "
                "`apt-get install dataset-fashion-mnist`, or pass root= (or set $LOWBIT_FASHION_MNIST) to a "
                "folder with the four IDX files.")
        paths.append(found)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ModelFileError(f"Fashion-MNIST files disagree: images {images.shape}, labels {labels.shape}")
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)
    if normalize:
        x = (x - FASHION_MEAN) / FASHION_STD
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def tensor_file(path: str | os.PathLike) -> TensorDataset:
    """Load tensors for the CLI: a ``.npy`` file (inputs only) or a ``.npz`` with inputs under ``x`` or
    ``inputs`` and optional labels under ``y`` or ``labels`` (a ``.npz`` with one array: inputs).

    Returns ``TensorDataset(x)`` or ``TensorDataset(x, y)``; floating arrays become float32.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"tensor file {path} does not exist")
    if path.suffix == ".npy":
        arrays = {"x": np.load(path, allow_pickle=False)}
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if len(arrays) == 1:
            arrays = {"x": next(iter(arrays.values()))}
    else:
        raise ModelFileError(f"{path}: expected a .npy or .npz file, got '{path.suffix}'")

    def pick(*names: str):
        return next((arrays[n] for n in names if n in arrays), None)

    x, y = pick("x", "inputs"), pick("y", "labels")
    if x is None:
        raise ModelFileError(f"{path} holds arrays {sorted(arrays)}; name the inputs 'x' (or 'inputs') and the "
                             "optional labels 'y' (or 'labels')")
    xt = torch.from_numpy(np.ascontiguousarray(x))
    if xt.is_floating_point():
        xt = xt.float()
    if y is None:
        return TensorDataset(xt)
    if len(y) != len(x):
        raise ModelFileError(f"{path}: {len(x)} inputs but {len(y)} labels")
    return TensorDataset(xt, torch.from_numpy(np.ascontiguousarray(y)).long())


@dataclass(frozen=True)
class SentencePairs:
    """STS-style pairs: ``sentences1[i]`` vs ``sentences2[i]`` with gold similarity ``scores[i]`` (0..5)."""

    sentences1: tuple[str, ...]
    sentences2: tuple[str, ...]
    scores: torch.Tensor

    def __len__(self) -> int:
        return len(self.sentences1)


def stsb(split: str = "test", path: str | os.PathLike | None = None) -> SentencePairs:
    """STS Benchmark ``dev`` (1 500 pairs) or ``test`` (1 379 pairs).

    Folder: ``path``, else ``$LOWBIT_STSB``, else ``../shared/data/stsb``; file ``sts-<split>.csv``,
    tab-separated: genre, file, year, id, score, sentence 1, sentence 2 (extra trailing columns ignored).
    """
    if split not in ("dev", "test", "train"):
        raise ConfigError(f"split must be 'dev', 'test' or 'train', got {split!r}")
    f = shared_data_dir("stsb", path, "LOWBIT_STSB") / f"sts-{split}.csv"
    if not f.is_file():
        raise DataNotFoundError(f"STS-B file {f} not found")
    s1, s2, scores = [], [], []
    for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 7:
            raise ModelFileError(f"{f}:{n}: expected at least 7 tab-separated columns, got {len(cols)}")
        scores.append(float(cols[4]))
        s1.append(cols[5])
        s2.append(cols[6])
    return SentencePairs(tuple(s1), tuple(s2), torch.tensor(scores, dtype=torch.float64))


def loader(dataset: Dataset, batch_size: int = 32, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A ``DataLoader`` of ``(x, y)`` batches; shuffling (when asked) is seeded, so runs repeat."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)


def _disjoint_split(calib: list[int], rest: list[int], n_eval: int, n_calib: int, what: str) -> tuple[list[int], list[int]]:
    """The first ``n_calib`` of ``calib`` and ``n_eval`` of ``rest`` at evenly spaced positions (first and
    last included); refuses counts the pools cannot supply (evaluation indices would repeat)."""
    if not 0 <= n_calib <= len(calib) or not 0 <= n_eval <= len(rest):
        raise ConfigError(
            f"{what} has {len(calib)} calibration and {len(rest)} evaluation samples; asked for {n_calib} and "
            f"{n_eval}: ask for at most that many."
        )
    return [rest[i] for i in torch.linspace(0, len(rest) - 1, n_eval).round().long().tolist()], calib[:n_calib]


def every_fourth_split(n: int, n_eval: int, n_calib: int) -> tuple[list[int], list[int]]:
    """``(evaluation indices, calibration indices)`` of ``n`` samples, disjoint: calibration takes every 4th
    sample (0, 4, 8 ...; the first ``n_calib``), evaluation ``n_eval`` evenly spaced among the others
    (the DFQ/AdaRound and mixed-precision benchmarks' split). :class:`ConfigError` when ``n_calib`` exceeds
    ``ceil(n / 4)`` or ``n_eval`` the rest."""
    return _disjoint_split(list(range(0, n, 4)), [i for i in range(n) if i % 4], n_eval, n_calib,
                           f"every_fourth_split of {n} samples")


def halves_split(n: int, fold: int, n_eval: int, n_calib: int) -> tuple[list[int], list[int]]:
    """``(evaluation indices, calibration indices)`` of fold ``fold`` (0 or 1) of a two-fold
    cross-validation over ``n`` samples: calibration takes the samples of parity ``fold`` (the first
    ``n_calib``), evaluation ``n_eval`` evenly spaced among the other half, so the two folds together
    evaluate every sample once, each with a model calibrated on samples it was not among.
    :class:`ConfigError` for another ``fold`` or counts larger than the halves."""
    if fold not in (0, 1):
        raise ConfigError(f"halves_split: fold must be 0 or 1 (the calibration parity), got {fold!r}")
    return _disjoint_split(list(range(fold, n, 2)), list(range(1 - fold, n, 2)), n_eval, n_calib,
                           f"fold {fold} of halves_split of {n} samples")


def imagenet_eval_and_calibration(samples: Dataset, n_images: int, n_extra: int, eval_batch: int = 25,
                                  calib_batch: int = 16) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The split the PTQ accuracy benchmark and its slow test share, over :func:`imagenet_samples`.

    Evaluation: every ``len // n_images``-th sample (``n_images`` of them), as ``(x, y)`` batches of
    ``eval_batch``. Calibration: foolbox's 20 labelled ImageNet images, then the first ``n_extra`` samples
    not evaluated (disjoint from the evaluation set), as input batches of ``calib_batch``.
    Returns ``(calibration batches, evaluation batches)``.
    """
    n = len(samples)
    evaluate = list(range(0, n, max(1, n // n_images)))[:n_images]
    used = set(evaluate)
    extra = [i for i in range(n) if i not in used][:n_extra]
    fb = foolbox_images("imagenet")
    xs = [fb[i][0] for i in range(len(fb))] + [samples[i][0] for i in extra]
    calib = [torch.stack(xs[i:i + calib_batch]) for i in range(0, len(xs), calib_batch)]
    batches = []
    for i in range(0, len(evaluate), eval_batch):
        items = [samples[j] for j in evaluate[i:i + eval_batch]]
        batches.append((torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])))
    return calib, batches


def calibration_batches(dataset: Dataset, num_samples: int | None = None, batch_size: int = 32,
                        seed: int | None = None) -> list[torch.Tensor]:
    """The inputs (labels dropped) of ``num_samples`` items as a list of ``(B, ...)`` tensors.

    Takes the first ``num_samples`` items, or a random subset drawn with ``seed`` when given.
    ``None`` takes the whole dataset. Feed the list to calibration as an iterable of tensors.
    """
    n = len(dataset)
    num_samples = n if num_samples is None else num_samples
    if not 0 < num_samples <= n:
        raise ConfigError(f"num_samples must be in 1..{n} (the dataset's size), got {num_samples}")
    if seed is None:
        idx = list(range(num_samples))
    else:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:num_samples].tolist()
    batches = []
    for i in range(0, num_samples, batch_size):
        items = [dataset[j] for j in idx[i:i + batch_size]]
        xs = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
        batches.append(torch.stack(xs))
    return batches

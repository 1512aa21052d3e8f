"""Real, offline evaluation and calibration data: ImageNet samples, foolbox's labelled images,
Fashion-MNIST, STS-B, any image folder, and ``.npy`` / ``.npz`` tensors.

Every image dataset yields ``(x, label)`` with ``x`` a float32 ``(C, H, W)`` tensor and ``label`` an int;
:func:`loader` batches them, :func:`calibration_batches` turns a dataset into the list of input tensors
that calibration takes. Nothing here downloads anything: see ``/work/shared/DATA.md`` for where each
set comes from, and every loader says how to get its data when it is missing.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import ConfigError, DataNotFoundError, ModelFileError
from .idx import read_idx
from .paths import package_dir, shared_data_dir
from .transforms import EFFICIENTNET_LITE, FASHION, FASHION_MEAN, FASHION_STD, MNIST, Preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
IMAGENET_CLASSES = 1000
_WNID = re.compile(r"n[0-9]{8}")
_INDEX = re.compile(r"[0-9]+")

log = logging.getLogger(__name__)


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
        try:
            x = self.preprocess(self.files[i])
        except OSError as e:  # PIL.UnidentifiedImageError, a truncated file: name the file
            raise ModelFileError(f"cannot read image {self.files[i]} ({type(e).__name__}: {str(e)[:200]}); "
                                 "remove or replace that file.") from e
        return x, self.labels[i]


def _is_image_name(name: str) -> bool:
    """An image file lowbit reads (:data:`IMAGE_SUFFIXES`), not hidden (``.name``, e.g. macOS ``._x.jpg``)."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _images_in(folder: Path) -> list[Path]:
    """The image files of ``folder`` (:func:`_is_image_name`), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_image_name(p.name))


def _images_under(folder: Path) -> list[Path]:
    """The image files anywhere below ``folder`` (a class folder may hold subfolders, as torchvision's
    ``ImageFolder`` allows), sorted by path; hidden files and folders are skipped."""
    found = []
    for top, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(top) / n for n in names if _is_image_name(n)]
    return sorted(found)


def imagenet_samples(path: str | os.PathLike | None = None,
                     preprocess: Preprocess = EFFICIENTNET_LITE) -> LabelledImages:
    """The 1000 ImageNet images, one per class; sorted file order is the class index 0..999.

    Folder: ``path``, else ``$LOWBIT_IMAGENET_SAMPLES``, else ``../shared/data/imagenet-samples``.
    Likely training-split images: use them for float-vs-quantized deltas, not absolute accuracy.
    A folder with another number of images is refused (:class:`ConfigError`): sorted order is the class
    index only for the full set; put a subset in an :func:`image_folder` with class-index subfolders.
    """
    folder = shared_data_dir("imagenet-samples", path, "LOWBIT_IMAGENET_SAMPLES")
    files = _images_in(folder)
    if not files:
        raise DataNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    if len(files) != IMAGENET_CLASSES:
        raise ConfigError(
            f"{folder} holds {len(files)} images, not {IMAGENET_CLASSES}: the sorted file order is the ImageNet "
            f"class index only for the full set of one image per class. For a subset use an image folder with one "
            f"subfolder per class named by its class index (<root>/990/<image>.jpg).")
    return LabelledImages(files, range(len(files)), preprocess)


FOOLBOX_KINDS = ("imagenet", "cifar10", "cifar100", "mnist", "fashionMNIST")


def foolbox_images(kind: str = "imagenet", preprocess: Preprocess | None = None) -> LabelledImages:
    """foolbox's 20 labelled sample images of one data set (label in the name: ``imagenet_03_990.jpg``).

    Default preprocessing: :data:`EFFICIENTNET_LITE` for ImageNet, :data:`MNIST` / :data:`FASHION` (each
    set's training mean and std) for MNIST / Fashion-MNIST,
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
        preprocess = {"imagenet": EFFICIENTNET_LITE, "mnist": MNIST, "fashionMNIST": FASHION}.get(
            kind, Preprocess(resize=None, crop=None, mean=(0.0,) * 3, std=(1.0,) * 3))
    return LabelledImages(files, labels, preprocess)


def _refuse_mixed(root: Path, classes: list[str], named: list[str], kind: str, fix: str) -> None:
    """ConfigError when some but not all of ``classes`` are ``named`` (integer or WordNet-id folder names)."""
    if len(named) != len(classes):
        other = next(c for c in classes if c not in named)
        raise ConfigError(f"{root} mixes {kind} ({named[0]!r} ...) with other names ({other!r} ...); {fix}")


def _class_indices(root: Path, classes: list[str]) -> dict[str, int]:
    """Folder name -> class index by the rules of :func:`image_folder` (``classes`` sorted)."""
    numeric = [c for c in classes if _INDEX.fullmatch(c)]
    wnids = [c for c in classes if _WNID.fullmatch(c)]
    if numeric:
        _refuse_mixed(root, classes, numeric, "class-index folders",
                      "name every class folder by its class index (0, 1, ... as the model numbers its outputs) or none.")
        index = {c: int(c) for c in classes}
        if len(set(index.values())) != len(index):
            dup = sorted(c for c in classes if list(index.values()).count(index[c]) > 1)
            raise ConfigError(f"{root}: the class folders {dup} name the same class index; keep one folder per class.")
        return index
    if wnids:
        _refuse_mixed(root, classes, wnids, "WordNet-id class folders",
                      "give all 1000 ImageNet wnid folders, or name every class folder by its class index (0..999).")
        if len(wnids) != IMAGENET_CLASSES:
            raise ConfigError(
                f"{root} has {len(wnids)} WordNet-id class folders ({wnids[0]!r} ...), not all {IMAGENET_CLASSES} "
                "ImageNet classes: their sorted positions are not the ImageNet-1k class indices, and no offline "
                "wnid -> index table is available to map them. Rename each folder to its class index "
                "(n01440764 -> 0, n01443537 -> 1, ...), or add the missing classes' folders (they may be empty).")
    return {c: k for k, c in enumerate(classes)}


def image_folder(root: str | os.PathLike, preprocess: Preprocess = EFFICIENTNET_LITE) -> LabelledImages:
    """ImageNet layout: one subfolder per class, ``<root>/<class>/<image>.jpg``. The label of a class folder:

    * all folder names are integers (``0``, ``990``): the name is the class index, as written, so a folder
      holding a few of a model's classes is labelled as the model numbers them;
    * all names are WordNet ids (``n01440764``): there must be all 1000 ImageNet-1k classes, whose sorted order
      is the standard class index (a subset is refused with :class:`ConfigError`: without a wnid table its
      indices cannot be known; rename the folders to their class indices);
    * any other names: the index of the name in sorted order, 0..K-1 (torchvision ``ImageFolder``'s rule).

    Mixing integer or wnid names with other names is refused. The images of a class are all image files
    below its folder, in subfolders too (sorted by path); hidden folders and files (``.name``) are
    skipped; an empty class folder only holds its place. Attributes ``classes`` (folder names, sorted) and
    ``class_to_idx`` (name -> label) are set on the returned dataset.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataNotFoundError(f"{root} has no class subfolders; expected <root>/<class>/<image>.jpg")
    class_to_idx = _class_indices(root, classes)
    files, labels = [], []
    for name in classes:
        imgs = _images_under(root / name)
        if not imgs:
            others = [p.name for p in (root / name).rglob("*") if p.is_file() and not p.name.startswith(".")]
            if others:
                raise DataNotFoundError(
                    f"the class folder {root / name} holds {len(others)} entries ({others[0]!r} ...) but no image "
                    f"lowbit reads ({', '.join(IMAGE_SUFFIXES)}); convert them or move them out.")
            log.debug("image_folder: class folder %s is empty", root / name)
        files += imgs
        labels += [class_to_idx[name]] * len(imgs)
    if not files:
        raise DataNotFoundError(f"the class folders under {root} contain no images ({', '.join(IMAGE_SUFFIXES)})")
    ds = LabelledImages(files, labels, preprocess)
    ds.classes = classes
    ds.class_to_idx = class_to_idx
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

    Returns ``TensorDataset(x)`` or ``TensorDataset(x, y)``; floating inputs become float32, labels int64.
    Labels must be whole numbers: a floating label array is accepted only when every value is one
    (``2.0``), otherwise :class:`ModelFileError` (truncating ``2.7`` to class 2 would mislabel silently).
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
    y = np.asarray(y)
    if y.dtype.kind in "fc":
        whole = np.isfinite(y) & (y == np.round(y.real))
        if not whole.all():
            bad = y.reshape(-1)[~whole.reshape(-1)]
            raise ModelFileError(
                f"{path}: {bad.size} of {y.size} labels are not whole numbers (e.g. {bad[0].item()!r}); labels are class "
                "indices: save them as integers (numpy.savez(path, x=inputs, y=labels.astype(numpy.int64))).")
        y = y.real.astype(np.int64)
    elif y.dtype.kind not in "iub":
        raise ModelFileError(f"{path}: labels of dtype {y.dtype} are not class indices; save them as integers.")
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

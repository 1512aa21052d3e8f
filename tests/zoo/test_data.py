"""Loaders on temporary files written here: IDX, npy/npz, image folders, STS-B; preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import ConfigError, DataNotFoundError, ModelFileError
from lowbit.zoo import data
from lowbit.zoo.idx import write_idx
from lowbit.zoo.transforms import EFFICIENTNET_LITE, IMAGENET, Preprocess

Image = pytest.importorskip("PIL.Image", reason="pillow not installed: pip install pillow")


def _save(path, arr, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode=mode).save(path)


# --- preprocessing ---------------------------------------------------------------------------------
def test_preprocess_constant_image_closed_form(tmp_path):
    _save(tmp_path / "c.png", np.full((300, 400, 3), (0, 51, 255)))
    x = EFFICIENTNET_LITE(tmp_path / "c.png")
    assert x.dtype == torch.float32 and x.shape == (3, 224, 224)
    expected = torch.tensor([(0 / 255 - 0.5) / 0.5, (51 / 255 - 0.5) / 0.5, (255 / 255 - 0.5) / 0.5])
    torch.testing.assert_close(x, expected.view(3, 1, 1).expand(3, 224, 224), rtol=0, atol=1e-6)


def test_preprocess_crop_offset_closed_form(tmp_path):
    h, w = 8, 10
    img = (np.arange(w)[None, :] + 10 * np.arange(h)[:, None]).astype(np.uint8)
    _save(tmp_path / "g.png", img, mode="L")
    x = Preprocess(resize=None, crop=4, mean=(0.0,), std=(1.0 / 255,), mode="L")(tmp_path / "g.png")
    # top = round((8-4)/2) = 2, left = round((10-4)/2) = 3
    torch.testing.assert_close(x[0], torch.from_numpy(img[2:6, 3:7]).float(), rtol=0, atol=1e-4)


def test_preprocess_matches_torchvision(tmp_path):
    T = pytest.importorskip("torchvision.transforms", reason="torchvision not installed")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(300, 451), (333, 257), (180, 200)]):  # downscale, near-256, upscale
        _save(tmp_path / f"{i}.jpg", rng.integers(0, 256, (h, w, 3)))
        for pp in (EFFICIENTNET_LITE, IMAGENET):
            ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(pp.mean, pp.std)])
            with Image.open(tmp_path / f"{i}.jpg") as im:
                expected = ref(im.convert("RGB"))
            torch.testing.assert_close(pp(tmp_path / f"{i}.jpg"), expected, rtol=0, atol=1e-6)


def test_preprocess_config_errors():
    with pytest.raises(ConfigError, match="channel"):
        Preprocess(mean=(0.5,), std=(0.5,), mode="RGB")
    with pytest.raises(ConfigError, match="mode"):
        Preprocess(mode="CMYK")
    with pytest.raises(ConfigError, match="positive"):
        Preprocess(std=(0.5, 0.0, 0.5))


# --- image folders -----------------------------------------------------------------------------------
def test_image_folder_labels_and_values(tmp_path):
    for cls, value in (("dog", 200), ("cat", 10)):
        for k in range(2):
            _save(tmp_path / cls / f"{k}.png", np.full((230, 240, 3), value + k))
    (tmp_path / "notes.txt").write_text("ignored")
    ds = data.image_folder(tmp_path, Preprocess(resize=None, crop=224, mean=(0,) * 3, std=(1,) * 3))
    assert ds.classes == ["cat", "dog"] and ds.labels == [0, 0, 1, 1]
    values = [float(ds[i][0][0, 0, 0]) * 255 for i in range(4)]
    assert values == pytest.approx([10, 11, 200, 201], abs=1e-4)


def test_image_folder_reads_images_in_subfolders_of_a_class(tmp_path):
    """Like torchvision's ImageFolder: images nested below a class folder belong to that class."""
    _save(tmp_path / "cat" / "a.png", np.full((4, 4, 3), 1))
    _save(tmp_path / "cat" / "indoor" / "b.png", np.full((4, 4, 3), 2))
    _save(tmp_path / "cat" / "indoor" / "deep" / "c.png", np.full((4, 4, 3), 3))
    _save(tmp_path / "cat" / ".thumbs" / "d.png", np.full((4, 4, 3), 99))  # hidden: skipped
    _save(tmp_path / "dog" / "only_nested" / "e.png", np.full((4, 4, 3), 4))
    ds = data.image_folder(tmp_path, _RAW)
    assert _class_of_pixel(ds) == [(0, 1), (0, 2), (0, 3), (1, 4)]
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == [
        "cat/a.png", "cat/indoor/b.png", "cat/indoor/deep/c.png", "dog/only_nested/e.png"]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        data.image_folder(tmp_path / "nope")
    with pytest.raises(DataNotFoundError, match="subfolders"):
        data.image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataNotFoundError, match="no images"):
        data.image_folder(tmp_path)
    (tmp_path / "a" / "x.tif").write_bytes(b"II*\0")  # a class whose files are all of an unread type
    _save(tmp_path / "b" / "0.png", np.zeros((4, 4, 3)))
    with pytest.raises(DataNotFoundError, match=r"holds 1 entries \('x.tif'"):
        data.image_folder(tmp_path)


def _class_of_pixel(ds, pre_scale=255):
    """{label: pixel value} read back from the images (each test image is one constant value)."""
    return sorted((y, round(float(x[0, 0, 0]) * pre_scale)) for x, y in (ds[i] for i in range(len(ds))))


_RAW = Preprocess(resize=None, crop=None, mean=(0,) * 3, std=(1,) * 3)


def test_image_folder_numeric_names_are_class_indices(tmp_path):
    # as strings these sort "0" < "10" < "2" < "990": the sorted-position rule would label them 0, 1, 2, 3
    for name in ("990", "0", "10", "2"):
        _save(tmp_path / name / "a.png", np.full((4, 4, 3), int(name) % 256))
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    ds = data.image_folder(tmp_path, _RAW)
    assert _class_of_pixel(ds) == [(0, 0), (2, 2), (10, 10), (990, 990 % 256)]
    assert ds.class_to_idx == {"0": 0, "10": 10, "2": 2, "990": 990}


def test_image_folder_numeric_names_refuse_duplicates_and_mixtures(tmp_path):
    _save(tmp_path / "7" / "a.png", np.zeros((4, 4, 3)))
    _save(tmp_path / "007" / "a.png", np.zeros((4, 4, 3)))
    with pytest.raises(ConfigError, match=r"\['007', '7'\] name the same class index"):
        data.image_folder(tmp_path, _RAW)
    (tmp_path / "007" / "a.png").rename(tmp_path / "7" / "b.png")
    (tmp_path / "007").rename(tmp_path / "cat")
    with pytest.raises(ConfigError, match="mixes class-index folders"):
        data.image_folder(tmp_path, _RAW)


def test_image_folder_wnid_subset_is_refused(tmp_path):
    for i, wnid in enumerate(("n01440764", "n01443537")):  # ImageNet classes 0 and 1, but any two would do
        _save(tmp_path / wnid / "a.png", np.full((4, 4, 3), i))
    with pytest.raises(ConfigError, match="2 WordNet-id class folders .* not all 1000"):
        data.image_folder(tmp_path, _RAW)
    _save(tmp_path / "tench" / "a.png", np.zeros((4, 4, 3)))
    with pytest.raises(ConfigError, match="mixes WordNet-id class folders"):
        data.image_folder(tmp_path, _RAW)


def test_image_folder_all_1000_wnids_use_the_sorted_index(tmp_path):
    # wnid k is n{k:04d}0001 here, so its ImageNet-style index (position among 1000 sorted wnids) is k
    for k in range(1000):
        (tmp_path / f"n{k:04d}0001").mkdir()
    for k in (0, 3, 990, 999):
        _save(tmp_path / f"n{k:04d}0001" / "a.png", np.full((4, 4, 3), k % 256))
    ds = data.image_folder(tmp_path, _RAW)
    assert _class_of_pixel(ds) == [(0, 0), (3, 3), (990, 990 % 256), (999, 999 % 256)]


def test_unreadable_image_names_the_file(tmp_path):
    _save(tmp_path / "a" / "ok.png", np.zeros((4, 4, 3)))
    (tmp_path / "a" / "zbroken.jpg").write_bytes(b"not a jpeg")
    ds = data.image_folder(tmp_path, _RAW)
    assert ds[0][1] == 0
    with pytest.raises(ModelFileError, match=r"cannot read image .*zbroken\.jpg .*cannot identify image file"):
        ds[1]


def test_imagenet_samples_sorted_order_is_label(tmp_path, monkeypatch):
    # 1000 files whose names sort in the order 999 - k: the label of file k's image must be its sorted position
    for k in range(1000):
        value = 120 if k == 998 else 0
        shape = (256, 300, 3) if k == 998 else (1, 1, 3)
        _save(tmp_path / f"n{999 - k:04d}_{k}.jpg", np.full(shape, value))
    _save(tmp_path / "._n0000_apple_double.jpg", np.zeros((1, 1, 3)))  # macOS metadata: skipped
    monkeypatch.setenv("LOWBIT_IMAGENET_SAMPLES", str(tmp_path))
    ds = data.imagenet_samples()
    assert len(ds) == 1000 and ds.labels == list(range(1000))
    assert ds.files[1].name == "n0001_998.jpg"
    assert float(ds[1][0][0, 5, 5]) == pytest.approx((120 / 255 - 0.5) / 0.5, abs=2e-2)  # JPEG is lossy
    (tmp_path / "n0999_0.jpg").unlink()  # 999 images: sorted position is no longer the class index
    with pytest.raises(ConfigError, match="holds 999 images, not 1000"):
        data.imagenet_samples()
    monkeypatch.setenv("LOWBIT_IMAGENET_SAMPLES", str(tmp_path / "absent"))
    with pytest.raises(DataNotFoundError, match="LOWBIT_IMAGENET_SAMPLES"):
        data.imagenet_samples()


def test_foolbox_images_labels_from_names():
    pytest.importorskip("foolbox", reason="foolbox not installed: pip install foolbox")
    ds = data.foolbox_images("imagenet")
    assert len(ds) == 20 and ds.labels[:4] == [243, 559, 438, 990]
    fm = data.foolbox_images("fashionMNIST")
    assert fm.labels[:3] == [9, 2, 1] and fm[0][0].shape == (1, 28, 28)
    # each set is normalized with its own training statistics (MNIST's digits are mostly black: mean 0.1307)
    for kind, mean, std in (("mnist", 0.1307, 0.3081), ("fashionMNIST", 0.2860, 0.3530)):
        ds = data.foolbox_images(kind)
        with Image.open(ds.files[0]) as im:
            raw = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255)
        torch.testing.assert_close(ds[0][0][0], (raw - mean) / std, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError):
        data.foolbox_images("svhn")


# --- Fashion-MNIST from IDX ---------------------------------------------------------------------------
def test_fashion_mnist_from_temp_idx(tmp_path):
    imgs = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs.astype(np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([7, 0, 3], dtype=np.uint8))
    ds = data.fashion_mnist("test", root=tmp_path)
    x, y = ds.tensors
    assert x.dtype == torch.float32 and x.shape == (3, 1, 28, 28) and y.tolist() == [7, 0, 3]
    expected = (torch.from_numpy(imgs).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x[:, 0], expected, rtol=0, atol=1e-6)
    raw = data.fashion_mnist("test", root=tmp_path, normalize=False).tensors[0]
    torch.testing.assert_close(raw[:, 0], torch.from_numpy(imgs).float() / 255, rtol=0, atol=0)
    with pytest.raises(DataNotFoundError, match="dataset-fashion-mnist"):
        data.fashion_mnist("train", root=tmp_path)
    with pytest.raises(ConfigError):
        data.fashion_mnist("val", root=tmp_path)


# --- tensors and STS-B -------------------------------------------------------------------------------
def test_tensor_file_npy_npz(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.save(tmp_path / "a.npy", x)
    (t,) = data.tensor_file(tmp_path / "a.npy").tensors
    assert t.dtype == torch.float32 and t.tolist() == x.tolist()
    np.savez(tmp_path / "b.npz", inputs=x, labels=np.array([2, 0, 1]))
    xt, yt = data.tensor_file(tmp_path / "b.npz").tensors
    assert xt.tolist() == x.tolist() and yt.dtype == torch.int64 and yt.tolist() == [2, 0, 1]
    np.savez(tmp_path / "c.npz", whatever=x)
    assert data.tensor_file(tmp_path / "c.npz").tensors[0].tolist() == x.tolist()
    np.savez(tmp_path / "d.npz", a=x, b=x)
    with pytest.raises(ModelFileError, match="'x'"):
        data.tensor_file(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", x=x, y=np.arange(2))
    with pytest.raises(ModelFileError, match="labels"):
        data.tensor_file(tmp_path / "e.npz")
    with pytest.raises(ModelFileError, match=".npy or .npz"):
        (tmp_path / "f.csv").write_text("1,2")
        data.tensor_file(tmp_path / "f.csv")


def test_tensor_file_labels_must_be_whole_numbers(tmp_path):
    x = np.zeros((3, 2), np.float32)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([2.0, 0.0, 999.0], np.float32))
    yt = data.tensor_file(tmp_path / "a.npz").tensors[1]
    assert yt.dtype == torch.int64 and yt.tolist() == [2, 0, 999]
    for name, y, needle in (("b", [2.7, 0.0, 1.0], "1 of 3 labels are not whole numbers \\(e.g. 2.7\\)"),
                            ("c", [0.0, np.nan, 0.5], "2 of 3 labels are not whole numbers")):
        np.savez(tmp_path / f"{name}.npz", x=x, y=np.array(y))
        with pytest.raises(ModelFileError, match=needle):
            data.tensor_file(tmp_path / f"{name}.npz")
    np.savez(tmp_path / "d.npz", x=x, y=np.array(["a", "b", "c"]))
    with pytest.raises(ModelFileError, match="dtype <U1 are not class indices"):
        data.tensor_file(tmp_path / "d.npz")


def test_stsb_parse(tmp_path):
    (tmp_path / "sts-dev.csv").write_text(
        "main-captions\tMSRvid\t2012test\t0001\t5.000\tA man.\tA man!\n"
        "main-news\theadlines\t2013\t0002\t1.250\tOne\tTwo\textra\tcolumns\n", encoding="utf-8")
    pairs = data.stsb("dev", tmp_path)
    assert pairs.sentences1 == ("A man.", "One") and pairs.sentences2 == ("A man!", "Two")
    assert pairs.scores.tolist() == [5.0, 1.25] and len(pairs) == 2
    with pytest.raises(DataNotFoundError):
        data.stsb("test", tmp_path)


# --- batching ----------------------------------------------------------------------------------------
def test_calibration_batches():
    ds = torch.utils.data.TensorDataset(torch.arange(10.0).view(10, 1), torch.zeros(10, dtype=torch.long))
    b = data.calibration_batches(ds, 7, batch_size=3)
    assert [t.view(-1).tolist() for t in b] == [[0, 1, 2], [3, 4, 5], [6]]
    r = data.calibration_batches(ds, 10, batch_size=4, seed=1)
    assert sorted(torch.cat(r).view(-1).tolist()) == list(range(10))
    assert torch.equal(torch.cat(r), torch.cat(data.calibration_batches(ds, 10, batch_size=4, seed=1)))
    with pytest.raises(ConfigError, match="num_samples"):
        data.calibration_batches(ds, 11)
    xs, ys = next(iter(data.loader(ds, batch_size=4)))
    assert xs.view(-1).tolist() == [0, 1, 2, 3]


def test_every_fourth_split_is_disjoint_and_evenly_spaced():
    ev, cal = data.every_fourth_split(1000, 750, 250)
    assert cal == list(range(0, 1000, 4)) and ev == [i for i in range(1000) if i % 4]
    ev, cal = data.every_fourth_split(1000, 3, 2)
    assert cal == [0, 4] and ev == [1, 499, 999]


@pytest.mark.parametrize("fold", [0, 1])
def test_halves_split_folds_evaluate_every_sample_once(fold):
    ev, cal = data.halves_split(1000, fold, 500, 500)
    assert cal == list(range(fold, 1000, 2)) and not set(ev) & set(cal)
    other_ev, other_cal = data.halves_split(1000, 1 - fold, 500, 500)
    assert sorted(ev + other_ev) == list(range(1000)) and ev == other_cal
    ev, cal = data.halves_split(10, fold, 3, 2)
    assert cal == [fold, fold + 2] and ev == [1 - fold, 5 - fold, 9 - fold]


def test_splits_refuse_counts_their_pools_cannot_supply():
    with pytest.raises(ConfigError, match="250 calibration and 750 evaluation"):
        data.every_fourth_split(1000, 751, 250)
    with pytest.raises(ConfigError, match="asked for 251"):
        data.every_fourth_split(1000, 750, 251)
    with pytest.raises(ConfigError, match="500 calibration and 500 evaluation"):
        data.halves_split(1000, 1, 501, 10)
    with pytest.raises(ConfigError, match="fold must be 0 or 1"):
        data.halves_split(1000, 2, 10, 10)

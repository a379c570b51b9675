"""MNIST, Fashion-MNIST and KMNIST read with numpy from their IDX archives in data.manual_dir (cnn/data/idx.py).

That these arrays equal TFDS's prepared ones is checked on the real archives in test_mnist.py; here small
archives written by the tests check the format, the order, the slices and every refusal.
"""

import gzip
import hashlib
import subprocess
import sys

import numpy as np
import pytest

import cnn
from cnn.data import idx
from conftest import REPO, SHARED_DATASETS

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def write_idx(path, array: np.ndarray) -> None:
    """The IDX format: 0x0000, 0x08 (unsigned bytes), the number of dimensions, each size big-endian, the bytes."""
    header = bytes((0, 0, 8, array.ndim)) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.fixture
def archives(tmp_path):
    """Un-gzipped archives of 30 training and 10 test images (the .gz names would be checked against TFDS's
    checksums of the real files): (folder, {split: (images, labels)} in file order)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 30), ("test", 10)):
        images, labels = rng.integers(0, 256, (count, 28, 28), np.uint8), rng.integers(0, 10, count, np.uint8)
        write_idx(tmp_path / FILES[split][0], images)
        write_idx(tmp_path / FILES[split][1], labels)
        arrays[split] = images, labels
    return tmp_path, arrays


def kmnist(folder, **fields):
    config = cnn.load_config(str(REPO / "configs" / "kmnist.py"))
    config.data.manual_dir = str(folder)
    config.data.update(fields)
    return config.data


def tfds_order(split: str, count: int) -> np.ndarray:
    """The order TFDS's preparation writes a split in, written out here from its documented rule: example i
    at the rank of MD5(split name + str(i))."""
    return np.argsort([int(hashlib.md5(f"{split}{i}".encode()).hexdigest(), 16) for i in range(count)], kind="stable")


def test_archives_give_tfds_rows_order_and_class_names(archives):
    folder, arrays = archives
    dataset = cnn.load_dataset(kmnist(folder))
    assert dataset.class_names[:4] == ["o", "ki", "su", "tsu"]  # TFDS's names, not '0'..'9'
    for split, part in (("train", dataset.train), ("test", dataset.test)):
        images, labels = arrays[split]
        order = tfds_order(split, len(labels))
        assert not np.array_equal(order, np.arange(len(labels)))
        assert part.images.dtype == np.uint8 and part.images.shape == (len(labels), 28, 28, 1)
        assert part.labels.dtype == np.int32
        np.testing.assert_array_equal(part.images[..., 0], images[order])
        np.testing.assert_array_equal(part.labels, labels[order])


def test_split_slices_mean_what_they_mean_to_tfds(archives):
    folder, _ = archives
    full = cnn.load_dataset(kmnist(folder))
    sliced = cnn.load_dataset(kmnist(folder, train_split="train[:20%]+test[-3:]", test_split="train[50%:]"))
    np.testing.assert_array_equal(sliced.train.images, np.concatenate([full.train.images[:6], full.test.images[-3:]]))
    np.testing.assert_array_equal(sliced.train.labels, np.concatenate([full.train.labels[:6], full.test.labels[-3:]]))
    np.testing.assert_array_equal(sliced.test.labels, full.train.labels[15:])
    with pytest.raises(cnn.ConfigError, match=r"data.train_split='validation' is not a split of kmnist .* it has "
                                              r"train, test"):
        cnn.load_dataset(kmnist(folder, train_split="validation"))


def _damage(folder, how):
    images, labels = (folder / name for name in FILES["train"])
    if how == "missing":
        (folder / FILES["test"][1]).unlink()
        return folder / (FILES["test"][1] + ".gz"), "does not exist; copy kmnist's four original archives"
    if how == "labels for images":
        images.write_bytes(labels.read_bytes())
        return images, "is not an IDX file of 3-dimensional bytes (it starts with 00000801, not 00000803)"
    if how == "cut short":
        images.write_bytes(images.read_bytes()[:5000])
        return images, "holds 4,984 bytes of data but its header says (30, 28, 28) (23,520); it is cut short"
    if how == "fewer labels":
        write_idx(labels, np.zeros(29, np.uint8))
        return labels, "holds 29 labels up to 0 for 30 images of 10 classes"
    if how == "other image size":
        write_idx(images, np.zeros((30, 32, 32), np.uint8))
        return images, "holds images of (32, 32), not (28, 28)"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "labels for images", "cut short", "fewer labels", "other image size"])
def test_a_missing_or_damaged_archive_is_one_line_naming_it(archives, how):
    folder, _ = archives
    path, message = _damage(folder, how)
    with pytest.raises(cnn.ConfigError) as error:
        cnn.load_dataset(kmnist(folder))
    assert str(error.value).startswith(f"data.manual_dir: {path} ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_gzip_cut_short_is_named(tmp_path):
    """A .gz that TFDS has no checksum for (any IDX file read with read_idx) is still refused by name."""
    path = tmp_path / "images-idx3-ubyte.gz"
    write_idx(path, np.zeros((5, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(cnn.ConfigError, match=rf"data.manual_dir: {path} could not be read \(EOFError"):
        idx.read_idx(str(path), 3)


def test_a_wrong_gz_archive_is_named_with_tfds_checksum(archives):
    folder, _ = archives
    write_idx(folder / (FILES["train"][0] + ".gz"), np.zeros((30, 28, 28), np.uint8))  # wins over the plain one
    with pytest.raises(cnn.ConfigError, match=r"train-images-idx3-ubyte.gz is not kmnist's train-images-idx3-ubyte.gz "
                                              r"\([\d,]+ bytes; expected [\d,]+ bytes with SHA-256 [0-9a-f]{64}\)"):
        cnn.load_dataset(kmnist(folder))


def test_mnist_archives_load_without_importing_tensorflow():
    """With TensorFlow installed (as under `.[dev]`), reading the archives still never imports it."""
    if not (SHARED_DATASETS / "mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"no MNIST archives in {SHARED_DATASETS} (set CNN_SHARED_DATASETS)")
    code = ("import sys, numpy as np, cnn; c = cnn.load_config('configs/mnist.py'); "
            f"c.data.manual_dir = {str(SHARED_DATASETS / 'mnist')!r}; d = cnn.load_dataset(c.data); "
            "print(d.train.images.shape, d.test.images.shape, d.train.labels.dtype, d.class_names == list('0123456789'),"
            " np.bincount(d.train.labels).sum(), 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "(60000, 28, 28, 1) (10000, 28, 28, 1) int32 True 60000 False", out.stderr
    assert out.stderr == "", out.stderr  # nothing to say: no preparation, no decoding progress, no warnings


def test_a_second_load_reads_the_cache_without_tfds(archives, monkeypatch, tmp_path):
    """The decoded splits and class names come back from the cache: TFDS's description is not asked again."""
    folder, arrays = archives
    first = cnn.load_dataset(kmnist(folder, train_split="train[:20%]+test[-3:]"))
    assert list((tmp_path / "cnn_cache" / "idx").iterdir())  # CNN_CACHE_DIR (conftest)

    def no_tfds(data):
        raise AssertionError("decoded again")

    monkeypatch.setattr(idx.tfds_lib, "tfds_builder", no_tfds)
    second = cnn.load_dataset(kmnist(folder, train_split="train[:20%]+test[-3:]"))
    assert second.class_names == first.class_names and second.class_names[:2] == ["o", "ki"]
    for a, b in ((first.train, second.train), (first.test, second.test)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert b.images.dtype == np.uint8 and b.labels.dtype == np.int32


def test_a_changed_archive_or_split_is_decoded_again(archives, capfd):
    folder, arrays = archives
    cnn.load_dataset(kmnist(folder))
    capfd.readouterr()
    images = np.flip(arrays["train"][0], axis=2)  # same size, other bytes
    write_idx(folder / FILES["train"][0], images)
    dataset = cnn.load_dataset(kmnist(folder))
    np.testing.assert_array_equal(dataset.train.images[..., 0], images[tfds_order("train", 30)])
    assert "the data changed since it was cached" in capfd.readouterr().err
    assert len(cnn.load_dataset(kmnist(folder, train_split="train[:10]")).train) == 10


def test_without_the_cache_nothing_is_written(archives, tmp_path):
    folder, _ = archives
    cnn.load_dataset(kmnist(folder, cache=False))
    assert not (tmp_path / "cnn_cache").exists()

"""MNIST and Fashion-MNIST prepared through TFDS offline from the original archive files in ../shared, and the
arrays cnn reads from those archives itself (cnn/data/idx.py) compared with TFDS's.

`cnn.load_dataset` reads the archives in data.manual_dir directly, so these tests prepare through TFDS by calling
`cnn.data.tfds.load_tfds`, TFDS's path for every other dataset.
"""

import subprocess
import sys

import numpy as np
import pytest

import cnn
from cnn.data.tfds import load_tfds
from conftest import REPO, SHARED_DATASETS

pytestmark = pytest.mark.slow


def mnist_config(data_dir, manual_dir=None):
    config = cnn.load_config(str(REPO / "configs" / "mnist.py"))
    config.data.data_dir, config.data.manual_dir = data_dir, manual_dir
    return config


@pytest.fixture(scope="module")
def prepared(shared_tfds_dir):
    """MNIST prepared through TFDS from its archives (TensorFlow, about 40 s) and decoded into its cache, in a
    process of its own whose stderr shows what a user would see: (data_dir, that stderr)."""
    if not (SHARED_DATASETS / "mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"no MNIST archives in {SHARED_DATASETS} (set CNN_SHARED_DATASETS)")
    code = ("import cnn; from cnn.data.tfds import load_tfds; c = cnn.load_config('configs/mnist.py'); "
            f"c.data.data_dir, c.data.manual_dir = {shared_tfds_dir!r}, {str(SHARED_DATASETS / 'mnist')!r}; "
            "load_tfds(c.data)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return shared_tfds_dir, proc.stderr


def test_preparing_mnist_through_tfds_is_quiet(prepared):
    _, stderr = prepared
    assert "Preparing mnist" in stderr
    # TensorFlow loaded to prepare it, quietly: none of its C++ start-up lines, nor TFDS's absl warnings.
    noise = ("oneDNN", "absl::InitializeLog", "cpu_feature_guard", "dataset_info.json", "OpenCV")
    assert not [n for n in noise if n in stderr], stderr


def test_the_archives_give_tfds_arrays_exactly(prepared):
    """Read from the archives or prepared by TFDS (here from its cache): the same rows, order, dtypes, names."""
    data_dir, _ = prepared
    archives = cnn.load_dataset(mnist_config(data_dir, str(SHARED_DATASETS / "mnist")).data)
    tfds_set = load_tfds(mnist_config(data_dir).data)
    assert archives.class_names == tfds_set.class_names == [str(i) for i in range(10)]
    for ours, theirs in ((archives.train, tfds_set.train), (archives.test, tfds_set.test)):
        assert ours.images.dtype == theirs.images.dtype == np.uint8 and ours.labels.dtype == theirs.labels.dtype
        np.testing.assert_array_equal(ours.images, theirs.images)
        np.testing.assert_array_equal(ours.labels, theirs.labels)
    assert archives.train.images.shape == (60000, 28, 28, 1) and len(archives.test) == 10000


def test_cached_mnist_loads_without_tensorflow(prepared):
    """The second load reads the decoded cache; TensorFlow stays out of the process."""
    code = ("import sys, cnn; c = cnn.load_config('configs/mnist.py'); "
            f"c.data.data_dir = {prepared[0]!r}; d = cnn.load_dataset(c.data); "
            "print(d.train.images.shape, d.test.images.shape, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "(60000, 28, 28, 1) (10000, 28, 28, 1) False", out.stderr
    assert "Decoded" not in out.stderr  # read from the cache, not decoded again


def test_prepared_mnist_reads_without_tensorflow_installed(prepared, without_tensorflow):
    """Prepared array_record files read through TFDS in a process where TensorFlow is not installed."""
    code = ("import cnn; c = cnn.load_config('configs/mnist.py'); "
            f"c.data.data_dir = {prepared[0]!r}; c.data.cache = False; c.data.train_split = 'train[:2000]'; "
            "c.data.test_split = 'test[:500]'; d = cnn.load_dataset(c.data); "
            "print(d.train.images.shape, d.test.images.shape, d.class_names[:2])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=without_tensorflow)
    assert out.stdout.strip() == "(2000, 28, 28, 1) (500, 28, 28, 1) ['0', '1']", out.stderr


def test_fashion_mnist_beside_mnist_gets_its_own_images(prepared):
    """Both sets use the same archive names; TFDS must not reuse MNIST's unpacked files. The arrays equal those
    cnn reads from the archives itself."""
    config = cnn.load_config(str(REPO / "configs" / "fashion_mnist.py"))
    config.data.data_dir = prepared[0]
    config.data.manual_dir = str(SHARED_DATASETS / "fashion_mnist")
    fashion = load_tfds(config.data)
    assert fashion.class_names[:2] == ["T-shirt/top", "Trouser"]
    assert np.bincount(fashion.train.labels).tolist() == [6000] * 10  # MNIST's classes are uneven
    assert len(fashion.test) == 10000
    archives = cnn.load_dataset(config.data)
    assert archives.class_names == fashion.class_names
    for ours, theirs in ((archives.train, fashion.train), (archives.test, fashion.test)):
        np.testing.assert_array_equal(ours.images, theirs.images)
        np.testing.assert_array_equal(ours.labels, theirs.labels)


def test_tfds_split_over_the_budget_streams_the_same_images(prepared, capfd):
    """A TFDS split larger than data.max_memory_gb is decoded into its cache entry in pieces and read by rows;
    the rows equal the in-memory ones, on the first (decoding) load and on a later one from the cache."""
    config = mnist_config(prepared[0])
    config.data.train_split, config.data.test_split = "train[:3000]", "test[:500]"
    config.data.cache = False
    memory = cnn.load_dataset(config.data)
    config.data.cache, config.data.max_memory_gb = True, 1e-3  # 1 MB: the 2.4 MB train split streams
    for _ in range(2):
        streamed = cnn.load_dataset(config.data)
        assert type(streamed.train.images).__name__ == "DiskArray"
        assert isinstance(streamed.test.images, np.ndarray)  # 0.4 MB: within the budget
        rows = np.random.default_rng(0).permutation(3000)[:700]
        np.testing.assert_array_equal(streamed.train.images[rows], memory.train.images[rows])
        np.testing.assert_array_equal(streamed.train.labels, memory.train.labels)
        assert "decoded > data.max_memory_gb=0.001: streaming from" in capfd.readouterr().err

"""MNIST and Fashion-MNIST prepared offline from the original archive files in ../shared."""

import json
import subprocess
import sys

import numpy as np
import pytest

import cnn
from conftest import REPO, SHARED_DATASETS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(shared_tfds_dir):
    if not (SHARED_DATASETS / "mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"no MNIST archives in {SHARED_DATASETS} (set CNN_SHARED_DATASETS)")
    return shared_tfds_dir


def test_mnist_from_manual_dir_trains_well_above_chance(data_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cnn.main", "--config=configs/mnist.py", f"--workdir={tmp_path}",
         f"--config.data.data_dir={data_dir}", f"--config.data.manual_dir={SHARED_DATASETS / 'mnist'}",
         "--config.data.train_split=train[:20%]", "--config.train.num_epochs=1"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Preparing mnist" in proc.stderr
    # TensorFlow loaded to prepare it, quietly: none of its C++ start-up lines, nor TFDS's absl warnings.
    noise = ("oneDNN", "absl::InitializeLog", "cpu_feature_guard", "dataset_info.json", "OpenCV")
    assert not [n for n in noise if n in proc.stderr], proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test_accuracy"] > 0.9  # chance is 0.1; the full test split of 10,000 images
    assert results["steps"] == 12000 // 128


def test_cached_mnist_loads_without_tensorflow(data_dir):
    """The second load reads the decoded cache; TensorFlow stays out of the process."""
    code = ("import sys, cnn; c = cnn.load_config('configs/mnist.py'); "
            f"c.data.data_dir = {data_dir!r}; c.data.train_split = 'train[:20%]'; d = cnn.load_dataset(c.data); "
            "print(d.train.images.shape, d.test.images.shape, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "(12000, 28, 28, 1) (10000, 28, 28, 1) False", out.stderr


def test_prepared_mnist_reads_without_tensorflow_installed(data_dir, without_tensorflow):
    """Prepared array_record files read through TFDS in a process where TensorFlow is not installed."""
    code = ("import cnn; c = cnn.load_config('configs/mnist.py'); "
            f"c.data.data_dir = {data_dir!r}; c.data.cache = False; c.data.train_split = 'train[:2000]'; "
            "c.data.test_split = 'test[:500]'; d = cnn.load_dataset(c.data); "
            "print(d.train.images.shape, d.test.images.shape, d.class_names[:2])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=without_tensorflow)
    assert out.stdout.strip() == "(2000, 28, 28, 1) (500, 28, 28, 1) ['0', '1']", out.stderr


def test_fashion_mnist_beside_mnist_gets_its_own_images(data_dir):
    """Both sets use the same archive names; TFDS must not reuse MNIST's unpacked files."""
    config = cnn.load_config(str(REPO / "configs" / "fashion_mnist.py"))
    config.data.data_dir = data_dir
    config.data.manual_dir = str(SHARED_DATASETS / "fashion_mnist")
    fashion = cnn.load_dataset(config.data)
    assert fashion.class_names[:2] == ["T-shirt/top", "Trouser"]
    assert np.bincount(fashion.train.labels).tolist() == [6000] * 10  # MNIST's classes are uneven
    assert len(fashion.test) == 10000


def test_tfds_split_over_the_budget_streams_the_same_images(data_dir, capfd):
    """A TFDS split larger than data.max_memory_gb is decoded into its cache entry in pieces and read by rows;
    the rows equal the in-memory ones, on the first (decoding) load and on a later one from the cache."""
    config = cnn.load_config(str(REPO / "configs" / "mnist.py"))
    config.data.data_dir, config.data.manual_dir = data_dir, str(SHARED_DATASETS / "mnist")
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

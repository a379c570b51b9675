"""The base install has no TensorFlow: training on the digits, or on MNIST from its original archives, never imports
it, and preparing a TFDS dataset without it stops with one line naming the extra to install."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATASETS


def test_import_cnn_and_a_digits_run_leave_tensorflow_unimported(tmp_path):
    """Installed (as under `.[dev]`), TensorFlow is still never imported by `import cnn`, training or the pictures."""
    code = ("import sys, cnn; assert 'tensorflow' not in sys.modules, 'import cnn'; "
            "c = cnn.load_config('configs/digits.py'); c.train.num_epochs = 1; "
            f"run = cnn.train_and_evaluate(c, {str(tmp_path)!r}); cnn.plots.write_plots({str(tmp_path)!r}, run, "
            "run.dataset); print(run.results['steps'], sorted(m for m in sys.modules if m.startswith('tensorflow.'"
            ") or m == 'tensorflow'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "44 []"


def test_digits_quick_start_trains_without_tensorflow(tmp_path, without_tensorflow):
    proc = subprocess.run([sys.executable, "-m", "cnn.main", "--config=configs/digits.py", f"--workdir={tmp_path}",
                           "--config.train.num_epochs=1"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=without_tensorflow)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "results.json").read_text())["test_accuracy"] > 0.5  # chance: 0.1
    assert (tmp_path / "plots" / "learning_curves.png").exists()


@pytest.mark.slow
def test_mnist_trains_from_its_archives_without_tensorflow(tmp_path, without_tensorflow):
    """configs/mnist.py, one epoch (about 30 s on 2 cores), read straight from the four IDX archives."""
    if not (SHARED_DATASETS / "mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"no MNIST archives in {SHARED_DATASETS} (set CNN_SHARED_DATASETS)")
    proc = subprocess.run([sys.executable, "-m", "cnn.main", "--config=configs/mnist.py", f"--workdir={tmp_path}",
                           f"--config.data.manual_dir={SHARED_DATASETS / 'mnist'}", "--config.train.num_epochs=1",
                           "--config.train.pictures=False"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=without_tensorflow)
    assert proc.returncode == 0, proc.stderr
    assert "Preparing" not in proc.stderr and "Decoded" not in proc.stderr  # no TFDS step, nothing to cache
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test_accuracy"] > 0.97  # chance is 0.1; the full test split of 10,000 images
    assert results["steps"] == 60000 // 128


def test_preparing_a_tfds_dataset_without_tensorflow_names_the_extra(tmp_path, without_tensorflow):
    """MNIST with no archives in data.manual_dir and nothing prepared: TFDS would have to prepare it."""
    proc = subprocess.run([sys.executable, "-m", "cnn.main", "--config=configs/mnist.py", f"--workdir={tmp_path / 'run'}",
                           f"--config.data.data_dir={tmp_path / 'tfds'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=without_tensorflow)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "preparing a TFDS dataset needs TensorFlow: pip install -e '.[tfds]'" in errors[0]
    assert "data.name='mnist' is not prepared in" in errors[0]
    assert "or set data.manual_dir to a folder holding its four original IDX archives" in errors[0]

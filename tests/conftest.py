import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# Every test process, and each process a test starts, keeps its compiled XLA programs where `cnn` training keeps them
# (cnn/runtime.py: use_compilation_cache), from its first jit: tests compile the same programs many times (a layer
# with and without the fast paths, the same model's init, a check rerun under another oneDNN instruction set, the
# same run in several `python -m cnn.main`), and XLA's compilation is most of their time on 2 cores.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "cnn" / "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# The original MNIST / Fashion-MNIST archives, beside the checkout in CI.
SHARED_DATASETS = pathlib.Path(os.environ.get("CNN_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


@pytest.fixture
def config_path():
    return lambda name: str(CONFIGS / f"{name}.py")


@pytest.fixture(autouse=True)
def _no_user_tfds_dir(monkeypatch, tmp_path):
    """Keeps tests away from the user's ~/tensorflow_datasets and ~/.cache/cnn."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("CNN_CACHE_DIR", str(tmp_path / "cnn_cache"))


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """Digits trained for 2 epochs once per session, with its pictures drawn as `python -m cnn.main` draws them;
    shared by the picture and prediction tests: (workdir, TrainResult, Dataset)."""
    import cnn

    workdir = tmp_path_factory.getbasetemp() / "digits-2-epochs"
    config = cnn.load_config(str(CONFIGS / "digits.py"))
    config.train.num_epochs = 2
    run = cnn.train_and_evaluate(config, str(workdir))
    cnn.plots.write_plots(str(workdir), run, run.dataset)
    return str(workdir), run, cnn.load_dataset(config.data)


@pytest.fixture(scope="session")
def shared_tfds_dir(tmp_path_factory):
    """One TFDS data_dir for the session, so MNIST and Fashion-MNIST are prepared (TensorFlow, ~40 s) once."""
    return str(tmp_path_factory.mktemp("tfds-shared"))


# Imported at start-up (sitecustomize) by a subprocess given without_tensorflow's environment: TensorFlow then looks
# not installed, to imports and to importlib.util.find_spec alike, while every other package imports as usual.
_HIDE_TENSORFLOW = '''
import importlib.abc, importlib.machinery, sys


class _HideTensorFlow(importlib.abc.MetaPathFinder):
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        return None if name.partition(".")[0] == "tensorflow" else self.inner.find_spec(name, path, target)

    def invalidate_caches(self):
        self.inner.invalidate_caches()


sys.meta_path[:] = [_HideTensorFlow(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


@pytest.fixture
def without_tensorflow(tmp_path):
    """An environment for subprocesses in which TensorFlow is not installed, as after `pip install -e .`."""
    folder = tmp_path / "hide_tensorflow"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(_HIDE_TENSORFLOW)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}

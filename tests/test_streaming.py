"""Data larger than data.max_memory_gb streams from its on-disk cache, and trains exactly as it would in memory.

The data is sklearn's digits written as an image folder (1,797 8x8 PNGs,
115 KB decoded), so a budget of 0.0001 GB (100 KB) is exceeded and 1 GB is not.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import cnn
from cnn import data as data_lib
from cnn import sharding
from conftest import REPO

TINY = "--config.data.max_memory_gb=0.0001"
TIMING = {"epoch_seconds", "images_per_second", "input_seconds", "elapsed_seconds", "time"}


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits_folder")
    digits = load_digits()
    for i, (image, label) in enumerate(zip(np.round(digits.images * (255 / 16)).astype(np.uint8), digits.target)):
        (root / str(label)).mkdir(exist_ok=True)
        Image.fromarray(image).save(root / str(label) / f"{i:04d}.png", compress_level=1)
    return str(root)


def args(folder, *extra):
    return ["--config=configs/digits.py", "--config.data.name=image_folder", f"--config.data.path={folder}",
            "--config.train.batch_size=16", "--config.train.pictures=False", *extra]


def start(workdir, folder, *extra, env=None):
    command = [sys.executable, "-m", "cnn.main", f"--workdir={workdir}", *args(folder, *extra)]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(workdir, folder, *extra, env=None, expect=0):
    process = start(workdir, folder, *extra, env=env)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == expect, f"exit {process.returncode}:\n{output[-3000:]}"
    return output


def records(workdir, name="metrics.jsonl"):
    with open(os.path.join(workdir, name)) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def params(workdir):
    config = cnn.load_config(str(REPO / "configs" / "digits.py"))
    fresh = cnn.train.create_state(cnn.build_model(config.model), cnn.train.make_optimizer(config.optimizer, 89, 2),
                                   (8, 8, 1), 0)
    state, _ = cnn.checkpoint.Checkpoints(str(workdir)).restore(fresh)
    return int(state.step), state.params


def load(folder, budget=None):
    config = cnn.load_config(str(REPO / "configs" / "digits.py"))
    config.data.name, config.data.path, config.data.max_memory_gb = "image_folder", folder, budget
    return cnn.load_dataset(config.data)


def test_budget_decides_memory_or_streamed(digits_folder, capfd):
    within = load(digits_folder, 1.0)
    assert "data: " not in capfd.readouterr().err and within.input_path == "memory"  # within budget: no line
    assert isinstance(within.train.images, np.ndarray)
    over = load(digits_folder, 0.0001)
    line = [l for l in capfd.readouterr().err.splitlines() if l.startswith("data: ")][0]
    assert line.startswith("data: 0.00 GB decoded > data.max_memory_gb=0.0001: streaming from ")
    assert os.path.isdir(line.split("streaming from ")[1])
    assert over.input_path == "streamed" and isinstance(over.train.images, data_lib.DiskArray)
    for a, b in ((within.train, over.train), (within.test, over.test)):
        np.testing.assert_array_equal(np.asarray(b.images), a.images)
        np.testing.assert_array_equal(b.labels, a.labels)
    rows = np.random.default_rng(0).integers(0, len(within.train), (7, 16))
    np.testing.assert_array_equal(over.train.images[rows], within.train.images[rows])  # a [steps, batch] gather
    assert data_lib.describe(over) == data_lib.describe(within)


@pytest.mark.parametrize("value", [-1.0, 0.0, True, "4"])
def test_bad_budget_is_one_config_error(value):
    config = cnn.load_config(str(REPO / "configs" / "digits.py"))
    config.data.__dict__["_fields"]["max_memory_gb"] = value  # past ml_collections' type check, as a loaded dict is
    with pytest.raises(cnn.ConfigError, match=r"^data\.max_memory_gb=.* is not valid: expected a positive number"):
        cnn.config.validate(config)


def test_bad_budget_on_the_command_line(tmp_path, digits_folder):
    for value, words in (("-2", "data.max_memory_gb=-2.0 is not valid"), ("lots", "data.max_memory_gb=lots")):
        output = finish(tmp_path, digits_folder, f"--config.data.max_memory_gb={value}", expect=2)
        errors = [l for l in output.splitlines() if l.startswith("error: ")]
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in output


def test_streamed_chunks_match_the_in_memory_ones(digits_folder):
    """Read ahead on a thread from disk, resumed mid-epoch, in short chunks: the same arrays as staged from memory."""
    within, over = load(digits_folder, 1.0), load(digits_folder, 0.0001)
    mesh = sharding.make_mesh(1)
    index = data_lib.epoch_index(len(within.train), 16, 0, 3)
    memory = list(data_lib.staged_chunks(within.train, index, 5, 10, sharding.chunk_sharding(mesh)))
    streamed = list(data_lib.staged_chunks(over.train, index, 5, 10, sharding.chunk_sharding(mesh)))
    assert len(memory) == len(streamed) == -(-(len(index) - 5) // 10)
    for a, b in zip(memory, streamed):
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_streamed_run_killed_then_resumed_is_bitwise_identical(tmp_path, digits_folder):
    """Killed once its third checkpoint (step 21, mid-epoch) is written but not yet in place; the rerun resumes at
    step 14 and ends as an uninterrupted streamed run, which itself equals the in-memory run."""
    extra = ("--config.train.num_epochs=2", "--config.train.checkpoint_every_steps=7")
    output = finish(tmp_path / "memory", digits_folder, *extra)
    assert "GB decoded" not in output  # the memory budget is news only when the data streams
    output = finish(tmp_path / "reference", digits_folder, *extra, TINY)
    assert "streaming from" in output
    killed = start(tmp_path / "killed", digits_folder, *extra, TINY, env={"CNN_FAULT": "kill:checkpoints:3"})
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    output = finish(tmp_path / "killed", digits_folder, *extra, TINY)
    assert "resuming from the checkpoint at step 14 (epoch 1, batch 14)" in output
    for name in ("metrics.jsonl", "steps.jsonl"):
        assert records(tmp_path / "killed", name) == records(tmp_path / "reference", name) == \
            records(tmp_path / "memory", name)
    (step, got), (ref_step, want) = params(tmp_path / "killed"), params(tmp_path / "reference")
    assert step == ref_step == 2 * 89
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    results = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert results["input_path"] == "streamed" and 0 <= results["input_share"] < 1
    assert json.loads((tmp_path / "memory" / "results.json").read_text())["input_path"] == "memory"


def test_two_processes_streamed_match_one(tmp_path, digits_folder):
    """Two processes of one device each train as one process on two devices: the same mesh, so the same
    partitioned program. (Against one device the float rounding differs, and on some CPUs two epochs amplify
    it past any tight tolerance.)"""
    finish(tmp_path / "one", digits_folder, TINY, "--config.train.num_epochs=2", "--config.train.num_devices=2")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = [start(tmp_path / "two", digits_folder, TINY, "--config.train.num_epochs=2",
                       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
                       "--config.train.num_devices=1") for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert all("streaming from" in out for out in outputs) and "in 2 processes" in outputs[0]
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    np.testing.assert_allclose([[r["train_loss"], r["test_loss"], r["test_accuracy"]] for r in two],
                               [[r["train_loss"], r["test_loss"], r["test_accuracy"]] for r in one], rtol=1e-5)
    assert json.loads((tmp_path / "two" / "results.json").read_text())["input_path"] == "streamed"


@pytest.mark.parametrize("held_out", [False, True])
def test_npz_over_budget_streams_the_same_arrays(tmp_path, held_out):
    """Float images in [0, 1], string labels in a given class order: copied into the cache in pieces, they read
    back as the in-memory path converts them, the held-out test split included."""
    rng = np.random.default_rng(0)
    x = rng.random((300, 6, 6, 3)).astype(np.float32)
    y = np.array(["cat", "dog", "eel"])[rng.integers(0, 3, 300)]
    arrays = {"x_train": x, "y_train": y} if held_out else \
        {"x_train": x[:240], "y_train": y[:240], "x_test": x[240:], "y_test": y[240:]}
    np.savez_compressed(tmp_path / "set.npz", **arrays, class_names=np.array(["eel", "cat", "dog"]))
    config = cnn.load_config(str(REPO / "configs" / "digits.py"))
    config.data.name, config.data.path = "npz", str(tmp_path / "set.npz")
    within = cnn.load_dataset(config.data)
    config.data.max_memory_gb = 1e-6
    over, again = cnn.load_dataset(config.data), cnn.load_dataset(config.data)  # built, then from the cache
    assert within.input_path == "memory" and over.input_path == again.input_path == "streamed"
    assert over.class_names == within.class_names == ["eel", "cat", "dog"]
    for dataset in (over, again):
        for split in ("train", "test"):
            np.testing.assert_array_equal(np.asarray(getattr(dataset, split).images), getattr(within, split).images)
            np.testing.assert_array_equal(getattr(dataset, split).labels, getattr(within, split).labels)


def test_default_budget_is_a_quarter_of_memory_shared_by_local_processes(monkeypatch):
    from cnn.data import stream

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    alone, why = stream.memory_budget(None)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < alone <= physical // 4 and "default" in why
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    assert stream.memory_budget(None)[0] == alone // 4
    assert stream.memory_budget(0.25) == (250_000_000, "data.max_memory_gb=0.25")

"""Damaged data and caches: files cut short by a failed copy, a cache killed mid-write or refused by a full disk."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import cnn
from conftest import REPO
from test_own_data import DIGIT_NAMES, _digits

TIMING = {"epoch_seconds", "images_per_second", "input_seconds", "elapsed_seconds", "time"}


def _folders(root, per_class=20):
    from PIL import Image

    images, labels = _digits()
    count = {}
    for i, (image, label) in enumerate(zip(images, labels)):
        if count.get(label, 0) < per_class:
            count[label] = count.get(label, 0) + 1
            (root / DIGIT_NAMES[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / DIGIT_NAMES[label] / f"{i:04d}.png")
    return root


def _train(root, workdir, cache, fault=None):
    env = {**os.environ, "CNN_CACHE_DIR": str(cache)}
    if fault:
        env["CNN_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "cnn.main", "--config=configs/digits.py", f"--workdir={workdir}",
         "--config.data.name=image_folder", f"--config.data.path={root}", "--config.train.num_epochs=2",
         "--config.train.batch_size=16", "--config.model.layers=('Flatten()', 'Dense(10)')",
         "--config.train.pictures=False"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _metrics(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _entries(cache):
    return [os.path.join(base, name) for base, dirs, _ in os.walk(cache) for name in dirs]


def test_a_cache_killed_mid_write_or_refused_by_a_full_disk_is_rebuilt(tmp_path):
    """SIGKILL with the arrays written but no manifest leaves no entry that reads as valid; a full disk is one line;
    each rerun rebuilds the entry and trains exactly as a run that never met either."""
    root = _folders(tmp_path / "digits")
    reference = _train(root, tmp_path / "reference", tmp_path / "cache-reference")
    assert reference.returncode == 0, reference.stderr

    cache = tmp_path / "cache"
    killed = _train(root, tmp_path / "killed", cache, fault="kill:cache:1")
    assert killed.returncode == -9 and not (tmp_path / "killed" / "results.json").exists()
    assert not any(os.path.exists(os.path.join(e, "manifest.json")) for e in _entries(cache))  # nothing valid

    full = _train(root, tmp_path / "full", cache, fault="enospc:cache:1")
    errors = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    assert len(errors) == 1 and "could not write" in errors[0] and "No space left on device" in errors[0]
    assert str(cache) in errors[0]

    again = _train(root, tmp_path / "again", cache)
    assert again.returncode == 0, again.stderr
    assert _metrics(tmp_path / "again") == _metrics(tmp_path / "reference")
    assert not [name for e in _entries(cache) for name in [os.path.basename(e)] if ".tmp-" in name]  # cleared
    cached = _train(root, tmp_path / "cached", cache)
    assert cached.returncode == 0 and "from the cache" in cached.stderr
    assert _metrics(tmp_path / "cached") == _metrics(tmp_path / "reference")


def test_files_cut_short_are_named(tmp_path):
    """A truncated .npz or .ts file (a failed copy) is one ConfigError naming the file, not a library's trace."""
    arrays = {"x_train": np.zeros((40, 8, 8), np.uint8), "y_train": np.arange(40) % 2,
              "x_test": np.zeros((10, 8, 8), np.uint8), "y_test": np.arange(10) % 2}
    np.savez(tmp_path / "whole.npz", **arrays)
    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    config = cnn.base_config()
    config.data.name, config.data.path = "npz", str(tmp_path / "cut.npz")
    with pytest.raises(cnn.ConfigError, match=r"cut.npz' could not be read as an .npz file .*cut short"):
        cnn.load_dataset(config.data)

    row = lambda i: ",".join(str(v) for v in range(20)) + f":{'ab'[i % 2]}"
    text = "\n".join(["@problemName x", "@univariate true", "@classLabel true a b", "@data", *map(row, range(20))])
    (tmp_path / "cut_TRAIN.ts").write_text(text[:-30])  # the last series loses its end and its label
    config.data.name, config.data.path = "series_file", str(tmp_path / "cut_TRAIN.ts")
    with pytest.raises(cnn.ConfigError, match=r"cut_TRAIN.ts' line 24: .*is the file cut short\?"):
        cnn.load_dataset(config.data)


def test_a_download_from_a_server_that_never_answers_fails_within_its_timeout():
    """A network that drops packets leaves TFDS's requests waiting forever; under cnn's guard the download
    gives up after its timeout, so the run can end with the offline message. The server here accepts the
    connection and then says nothing, as a dead proxy does."""
    import socket
    import time

    pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.core.download import downloader

    from cnn.data import tfds as tfds_lib

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/train-images-idx3-ubyte.gz"
    start = time.time()
    try:
        with tfds_lib._downloads_fail_fast(timeout=(1.0, 1.0)), pytest.raises(Exception, match="timed out"):
            with downloader._open_url(url):
                pass
    finally:
        server.close()
    assert time.time() - start < 10  # one retry of a 1 s read timeout, not the 10 retries with backoff
    assert downloader.MAX_RETRIES == 10 and downloader._open_url.__name__ == "_open_url"  # restored

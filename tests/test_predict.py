"""Prediction from a trained digits model: on arrays (notebook), on image files of any kind (command line)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cnn
from cnn import inference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def trained(digits_run):
    workdir, run, dataset = digits_run
    return workdir, run, dataset.test


def test_results_hold_what_prediction_needs(trained):
    workdir, _, _ = trained
    results = json.loads(open(os.path.join(workdir, "results.json")).read())
    assert results["class_names"] == [str(i) for i in range(10)]
    assert results["input_shape"] == [8, 8, 1]
    assert results["border_brightness"] < 64  # white digits on black


def test_predict_on_arrays_agrees_with_the_test_accuracy(trained):
    workdir, run, test = trained
    top = cnn.predict(run, test.images, top_k=3)
    assert len(top) == len(test) and all(len(row) == 3 for row in top)
    assert all(row[0][1] >= row[1][1] >= row[2][1] and 0.0 <= sum(p for _, p in row) <= 1.0 + 1e-6 for row in top)
    accuracy = np.mean([row[0][0] == str(label) for row, label in zip(top, test.labels)])
    assert accuracy > 0.8
    assert accuracy == pytest.approx(run.results["test_accuracy"], abs=1e-6)

    # From the workdir (config.json + checkpoint), the same answers; floats in [0, 1] and 2-D images work too.
    loaded = cnn.load_run(workdir)
    again = cnn.predict(loaded, (test.images[:20, ..., 0] / 255.0).astype(np.float32), top_k=1)
    assert [row[0][0] for row in again] == [row[0][0] for row in top[:20]]
    one = cnn.predict(loaded, test.images[0], top_k=20)
    assert len(one) == 1 and len(one[0]) == 10  # top_k is capped at the number of classes


def test_load_run_refuses_what_is_not_a_trained_workdir(tmp_path):
    with pytest.raises(cnn.ConfigError, match="does not exist"):
        cnn.load_run(str(tmp_path / "nowhere"))
    with pytest.raises(cnn.ConfigError, match="no config.json"):
        cnn.load_run(str(tmp_path))
    config = cnn.load_config(os.path.join(REPO, "configs", "digits.py"))
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    with pytest.raises(cnn.ConfigError, match="no checkpoint yet"):
        cnn.load_run(str(tmp_path))


def _scaled(image: np.ndarray, factor: int) -> Image.Image:
    """An 8x8 digit drawn big, black on white, the way a person draws one."""
    return Image.fromarray(255 - image[..., 0]).resize((8 * factor, 8 * factor), Image.NEAREST)


def test_convert_flattens_inverts_and_resizes():
    digit = np.zeros((8, 8, 1), np.uint8)
    digit[1:7, 3:5] = 255  # a "1", white on black as in training
    info = {"border_brightness": 0.0}
    drawing = _scaled(digit, 50).convert("RGBA")  # 400x400, black ink, then make the white transparent
    pixels = np.asarray(drawing).copy()
    pixels[..., 3] = np.where(pixels[..., 0] > 128, 0, 255)
    array, notes = inference.convert(Image.fromarray(pixels), (8, 8, 1), info)
    assert array.shape == (8, 8, 1) and array.dtype == np.uint8
    assert array[0, 0, 0] < 30 and array[4, 3:5, 0].min() > 200  # dark background, bright stroke, as trained
    assert "flattened transparency onto white" in notes[0] and "inverted" in notes[0] and "resized to 8x8" in notes[0]
    same, notes = inference.convert(digit, (8, 8, 1), info)
    assert np.array_equal(same, digit) and notes == []
    kept, _ = inference.convert(_scaled(digit, 4), (8, 8, 1), info, invert="no")
    assert kept[0, 0, 0] > 200


def test_convert_frames_a_drawing_like_the_training_images():
    """A small drawing in a corner of a big page ends up centred, as big as the training digits (here half)."""
    page = np.full((400, 600), 255, np.uint8)
    page[20:120, 30:60] = 0  # a black bar near the top-left corner
    array, notes = inference.convert(page, (20, 20, 1), {"border_brightness": 0.0, "ink_extent": 0.5})
    ink = np.argwhere(array[..., 0] > 128)
    assert 9 <= ink[:, 0].max() - ink[:, 0].min() + 1 <= 11  # 100 px tall -> half of 20
    assert np.allclose(ink.mean(axis=0), 9.5, atol=1.0)  # centred on its centre of mass
    assert "centred on its centre of mass" in notes[0]
    plain, notes = inference.convert(page, (20, 20, 1), {"border_brightness": 0.0, "ink_extent": 0.5}, frame=False)
    assert "padded to 600x600" in notes[0] and np.argwhere(plain[..., 0] > 128).mean(axis=0)[0] < 6


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "cnn.predict", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_command_line_predicts_odd_files_and_reports_bad_ones(trained, tmp_path):
    workdir, run, test = trained
    probs = inference.probabilities(run, test.images)
    # Two test digits the model is sure of, of different classes.
    sure = [i for i in np.argsort(-probs.max(-1)) if probs[i].argmax() == test.labels[i]]
    first, second = sure[0], next(i for i in sure if test.labels[i] != test.labels[sure[0]])

    rgba = _scaled(test.images[first], 40).convert("RGBA")  # 320x320, transparent where white
    pixels = np.asarray(rgba).copy()
    pixels[..., 3] = 255 - pixels[..., 0]
    pixels[..., :3] = 0
    Image.fromarray(pixels).save(tmp_path / "drawn.png")
    big = _scaled(test.images[second], 300).convert("RGB")  # 2400x2400 colour JPEG
    big.save(tmp_path / "big.jpg", quality=92)
    (tmp_path / "x.png").write_text("not an image\n")

    done = _cli(f"--workdir={workdir}", "--top_k=2", str(tmp_path / "drawn.png"), str(tmp_path / "x.png"),
                str(tmp_path / "missing.png"), str(tmp_path / "big.jpg"))
    assert done.returncode == 2
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(tmp_path / "drawn.png"), str(tmp_path / "big.jpg")]
    assert lines[0].split(": ")[1].startswith(f"{test.labels[first]} (")
    assert lines[1].split(": ")[1].startswith(f"{test.labels[second]} (")
    assert all(line.count("%)") == 2 for line in lines)  # --top_k=2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors[0] == f"error: {tmp_path / 'x.png'}: not an image file (PIL cannot read it); pass a PNG or JPEG image"
    assert errors[1].startswith(f"error: {tmp_path / 'missing.png'}: no such file")
    assert errors[2] == "error: 2 of 4 files could not be predicted (see above)"
    notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and "RGBA" in notes[0] and "2400x2400 RGB" in notes[1] and "resized to 8x8" in notes[1]
    assert "Traceback" not in done.stderr


def test_command_line_names_a_missing_workdir_in_one_line(tmp_path):
    done = _cli(f"--workdir={tmp_path / 'nowhere'}", "a.png")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr, done.stderr


def test_summary_takes_a_config(config_path):
    config = cnn.load_config(config_path("digits"))
    assert "Total params: 76,522" in cnn.summary(config)
    assert "(None, 8, 8, 32)" in cnn.summary(config)
    mnist = cnn.load_config(config_path("mnist"))  # not prepared here: the shape comes from the description
    assert "Total params: 207,066" in cnn.summary(mnist)
    assert "(None, 6, 6, 32)" in cnn.summary(config, (6, 6, 1))
    with pytest.raises(cnn.ConfigError, match="needs input_shape"):
        cnn.summary(cnn.build_model(config.model))

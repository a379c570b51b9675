"""The pictures of a trained digits model: files, TensorBoard images, labelled figures, `python -m cnn.visualize`."""

import dataclasses
import glob
import itertools
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from cnn import plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PICTURES = ("learning_curves", "filters", "feature_maps", "confusion_matrix", "misclassified", "per_class_recall")


@pytest.fixture
def trained(digits_run):
    return digits_run


def test_training_ends_with_every_picture_as_a_png(trained):
    workdir, _, _ = trained
    assert sorted(os.listdir(os.path.join(workdir, "plots"))) == sorted(f"{name}.png" for name in PICTURES)
    for name in PICTURES:
        with Image.open(os.path.join(workdir, "plots", f"{name}.png")) as image:
            assert image.format == "PNG"
            assert image.width >= 500 and image.height >= 200, (name, image.size)
            # Not blank: a drawn picture has many distinct colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50, name


def _events(workdir: str):
    """Every Event in the workdir's TensorBoard files (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            yield event


def test_tensorboard_shows_the_pictures(trained):
    workdir, run, _ = trained
    images = {}
    for event in _events(workdir):
        for value in event.summary.value:
            if value.HasField("image"):
                images[value.tag] = (event.step, value.image)
    assert set(images) == {f"plots/{name}" for name in PICTURES}
    for step, image in images.values():
        assert step == int(run.state.step)
        assert image.encoded_image_string.startswith(b"\x89PNG") and image.width >= 500


def test_pictures_never_overwrite_the_training_curves(tmp_path, monkeypatch):
    """tensorboardX names event files by the second and host: pictures drawn within the second training's writer
    opened (a fast run, its steps compiled from the cache) once replaced the file holding the curves. Here every
    file is opened in the same second."""
    import types

    import cnn
    from tensorboardX import event_file_writer

    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1.7e9, sleep=lambda s: None))
    config = cnn.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py"))
    config.train.num_epochs = 1
    run = cnn.train_and_evaluate(config, str(tmp_path))
    cnn.plots.write_plots(str(tmp_path), run, run.dataset)
    tags = {value.tag for event in _events(str(tmp_path)) for value in event.summary.value}
    assert {"train/epoch_loss", "test/accuracy", "plots/filters"} <= tags


def _texts(fig: Figure) -> list:
    """Every text drawn: titles, axis and tick labels (of ticks in view), legends, annotations."""
    texts = list(fig.texts) + [sub._suptitle for sub in fig.subfigs if sub._suptitle]
    texts += [fig._suptitle] if fig._suptitle else []
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
        for axis, coordinate in ((ax.xaxis, 0), (ax.yaxis, 1)) if ax.axison else ():
            lo, hi = sorted(axis.get_view_interval())
            texts += [t for t in axis.get_ticklabels() if lo - 1e-9 <= t.get_position()[coordinate] <= hi + 1e-9]
    unique = {id(t): t for t in texts if t.get_visible() and t.get_text().strip()}
    return list(unique.values())


def _overlaps(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of visible texts whose drawn boxes intersect."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _texts(fig)]
    return [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2)
            if box_a.overlaps(box_b) and box_a.width and box_b.width]


def test_figures_are_titled_labelled_and_do_not_overlap(trained):
    _, run, dataset = trained
    test = dataset.test
    # Fashion-MNIST's names: long, with spaces and slashes.
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    named = dataclasses.replace(run, class_names=names)

    curves = plots.learning_curves(run.history, "digits")
    assert isinstance(curves, Figure) and len(curves.axes) == 4
    labels = sorted({ax.get_xlabel() for ax in curves.axes})
    assert labels[0] == "epoch" and labels[1].startswith("wall time since the run started (")  # seconds or minutes
    assert len(labels) == 2

    matrix = plots.confusion_matrix(named, test)
    ax = matrix.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names == [t.get_text() for t in ax.get_yticklabels()]
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert f"{run.results['test_accuracy']:.2%}" in ax.get_title() and ax.get_title().endswith(" images right")

    mistakes = plots.misclassified(named, test)
    titles = [a.get_title() for a in mistakes.axes if a.get_title()]
    wrong = int((np.argmax(plots.probabilities(run, test.images), -1) != test.labels).sum())
    assert len(titles) == min(wrong, 24) > 0
    assert all(t.startswith("true: ") and "\npred: " in t and t.endswith("%)") for t in titles)
    assert all(t.split("\n")[0][len("true: "):] in names for t in titles)
    assert mistakes._suptitle.get_text().endswith(f"mistakes in {len(test):,} images")

    maps = plots.feature_maps(run, test.images[:2], test.labels[:2], max_channels=5)
    # Two images x two conv layers x (input + 5 channels).
    assert len(maps.axes) == 2 * 2 * 6
    labels = {a.get_ylabel() for a in maps.axes if a.get_ylabel()}
    assert labels == {"conv2d\n8x8x32", "conv2d_1\n8x8x32"}
    assert sum(a.get_title().startswith("ch ") for a in maps.axes) == 2 * 2 * 5

    kernels = plots.filters(run)
    assert sum(1 for a in kernels.axes if a.get_title().isdigit()) == 32  # + the colour bar

    recall = plots.per_class_recall(named, test)
    assert [t.get_text() for t in recall.axes[0].get_xticklabels()] == names
    assert f"{run.results['balanced_accuracy']:.2%}" in recall.axes[0].get_title()

    for fig in (curves, matrix, mistakes, maps, kernels, recall):
        assert not _overlaps(fig), _overlaps(fig)[:3]


@pytest.fixture(scope="module")
def series_run():
    """An untrained FCN (model.preset='fcn', as configs/ucr.py trains) on synthetic series, and its test split: what
    the pictures make of a 1-D model, without training one."""
    import optax

    import cnn
    from cnn.train import TrainResult, create_state

    config = cnn.base_config()
    config.data.name, config.data.max_length = "synthetic_series", 64
    dataset = cnn.load_dataset(config.data)
    model = cnn.build_model(cnn.models.presets.expand("fcn", dataset.num_classes))
    state = create_state(model, optax.sgd(0.1), dataset.input_shape, 0)
    run = TrainResult(state=state, model=model, history=[], results=cnn.data.describe(dataset),
                      class_names=dataset.class_names)  # results.json's class names and input shape, as a run's
    test = dataset.test
    return run, type(test)(test.images[:200], test.labels[:200])


def test_a_1d_model_draws_one_row_per_filter_and_calls_its_inputs_examples(series_run):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    run, test = series_run
    kernels = plots.filters(run)
    title = kernels._suptitle.get_text()
    assert title.replace("\n", " ") == "First convolution layer (conv1d): 128 filters of 8 taps on 1 input channel"
    [drawn] = [image for ax in kernels.axes for image in ax.images]
    kernel = np.asarray(run.state.params["conv1d"]["kernel"])  # (taps, input channels, filters) = (8, 1, 128)
    np.testing.assert_array_equal(drawn.get_array(), kernel[:, 0, :].T)  # a row per filter, a column per tap
    width, height = kernels.get_size_inches() * 110  # as write_plots saves it
    assert width >= 600 and height >= 300, (width, height)
    canvas = FigureCanvasAgg(kernels)
    canvas.draw()
    box = kernels._suptitle.get_window_extent(canvas.get_renderer())
    assert 0 <= box.x0 and box.x1 <= kernels.bbox.width and box.y1 <= kernels.bbox.height  # not cut off

    probs = plots.probabilities(run, test.images)
    matrix = plots.confusion_matrix(run, test, probs)
    assert matrix.axes[0].get_title().endswith(" of 200 examples right")
    mistakes = plots.misclassified(run, test, probs)
    assert mistakes._suptitle.get_text().endswith("mistakes in 200 examples")
    maps = plots.feature_maps(run, test.images[:2], test.labels[:2], probs=probs[:2])
    assert [sub._suptitle.get_text().split(":")[0] for sub in maps.subfigs] == ["Example 1", "Example 2"]
    for fig in (kernels, matrix, mistakes):
        assert not _overlaps(fig), _overlaps(fig)[:3]


def test_a_figure_shows_inline_without_pyplot(trained):
    _, run, _ = trained
    before = "matplotlib.pyplot" in sys.modules  # another test file may have imported it
    png = plots.filters(run)._repr_png_()
    assert png.startswith(b"\x89PNG")
    assert before or "matplotlib.pyplot" not in sys.modules


def _run(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_visualize_redraws_the_pictures_from_the_checkpoint(trained, tmp_path):
    from cnn.cli.visualize import visualize

    workdir, _, _ = trained
    shutil.rmtree(os.path.join(workdir, "plots"))
    visualize(workdir)  # what `python -m cnn.visualize --workdir=DIR` runs
    assert sorted(os.listdir(os.path.join(workdir, "plots"))) == sorted(f"{name}.png" for name in PICTURES)


def test_visualize_command_line_reports_a_missing_workdir_in_one_line(tmp_path):
    missing = _run("-m", "cnn.visualize", f"--workdir={tmp_path / 'nowhere'}")
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "does not exist" in missing.stderr, missing.stderr

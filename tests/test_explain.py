"""Grad-CAM and gradient saliency (cnn/explain.py): they light what the model looks at, in any model, and
`cnn visualize --explain` draws them for image files."""

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import cnn
from cnn import plots
from cnn.errors import ConfigError
from cnn.train import TrainResult, create_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = 16  # the images are SIDE x SIDE; the model sees only their top-left quadrant


class TopLeft(nn.Module):
    """A CNN that sees only the top-left quadrant of its input: the input is masked first. The convolutions have
    no bias, so everything outside the quadrant (and the 2 pixels their 3x3 kernels reach past it) is zero.
    `dropout` adds a (deterministic) Dropout module after the last convolution's ReLU."""

    num_classes: int = 2
    dropout: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        mask = jnp.zeros(x.shape[1:3]).at[:SIDE // 2, :SIDE // 2].set(1.0)
        x = x * mask[None, :, :, None]
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", use_bias=False)(x))
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", use_bias=False)(x))
        if self.dropout:
            x = nn.Dropout(0.5, deterministic=True)(x)
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def _squares(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Black images with a bright 3x3 square in a random quadrant; the label says whether it is the top-left one.
    A second square elsewhere (never top-left) distracts."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, SIDE, SIDE, 1), np.uint8)
    labels = rng.integers(0, 2, count)
    half = SIDE // 2
    others = [(0, half), (half, 0), (half, half)]
    for image, label in zip(images, labels):
        quadrants = [(0, 0)] if label else others
        for top, left in (quadrants[rng.integers(len(quadrants))], others[rng.integers(3)]):
            y, x = top + rng.integers(1, half - 4), left + rng.integers(1, half - 4)
            image[y:y + 3, x:x + 3] = 255
    return images, labels.astype(np.int32)


@pytest.fixture(scope="module")
def top_left_run(tmp_path_factory):
    """TopLeft trained for a few epochs to tell whether the top-left quadrant holds a square."""
    config = cnn.base_config()
    config.train.num_epochs, config.train.batch_size, config.train.pictures = 4, 32, False
    config.optimizer.name, config.optimizer.learning_rate = "adam", 1e-2
    dataset = cnn.from_arrays(*_squares(640, 0), *_squares(128, 1), class_names=["elsewhere", "top-left"])
    run = cnn.train_and_evaluate(config, str(tmp_path_factory.mktemp("top_left")), dataset=dataset,
                                 model=TopLeft(num_classes=2))
    assert run.results["test_accuracy"] > 0.9  # it learnt to look there
    return run, dataset.test


def test_grad_cam_lights_the_region_the_model_looks_at(top_left_run):
    run, test = top_left_run
    ex = plots.grad_cam(run, test.images)
    assert ex.heat_maps.shape == ex.saliency.shape == (len(test), SIDE, SIDE)
    assert ex.layer == "Conv_1"  # the module's last convolution
    np.testing.assert_array_equal(ex.classes, ex.probabilities.argmax(-1))
    np.testing.assert_allclose(ex.probabilities, cnn.plots.probabilities(run, test.images), atol=1e-5)
    seen = np.zeros((SIDE, SIDE), bool)
    seen[:SIDE // 2 + 2, :SIDE // 2 + 2] = True  # the quadrant and what two 3x3 kernels reach past it
    there = test.labels == 1  # a square in the quadrant: something to see
    np.testing.assert_allclose(ex.heat_maps[there].max(axis=(1, 2)), 1.0, atol=1e-6)
    assert (ex.heat_maps[~there] == 0.0).all()  # a black quadrant gives the last convolution nothing
    inside = ex.heat_maps[there][:, seen].sum(axis=1) / ex.heat_maps[there].sum(axis=(1, 2))
    assert (inside > 0.999).all(), inside.min()
    # The hottest point is on (or next to) the square in the quadrant.
    for image, heat in zip(test.images[there], ex.heat_maps[there]):
        y, x = np.unravel_index(heat.argmax(), heat.shape)
        assert image[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3].max() == 255
    assert ex.saliency[:, ~seen].max() == 0.0  # no gradient reaches what the model cannot see
    assert np.isclose(ex.saliency[there].max(axis=(1, 2)), 1.0).all()
    assert 0.0 <= ex.heat_maps.min() and ex.heat_maps.max() <= 1.0


@pytest.mark.parametrize("dropout", [False, True], ids=["conv output", "as the next module takes it"])
def test_grad_cam_equals_the_formula_on_a_model_whose_gradient_is_known(dropout):
    """TopLeft's logit c is Dense(mean over positions of relu(A)). Without a module after the last convolution the
    map is its output A, d logit_c / dA_k(p) = W[k, c] [A_k(p) > 0] / P; with Dropout after the ReLU, the map is
    Dropout's input relu(A), with gradient W[k, c] / P. Grad-CAM is relu(sum_k mean_p(gradient) map_k)."""
    run = _untrained(TopLeft(num_classes=2, dropout=dropout), (SIDE, SIDE, 1), num_classes=2)
    images = np.random.default_rng(0).integers(0, 256, (4, SIDE, SIDE, 1), dtype=np.uint8)
    ex = plots.grad_cam(run, images, class_index=1)
    assert (ex.layer, ex.taken_at) == ("Conv_1", "the output of Dropout_0" if dropout else None)
    [activation] = [a for name, a in plots.activations(run, images).items() if name == "Conv_1"]
    kernel = np.asarray(run.state.params["Dense_0"]["kernel"])[:, 1]
    if dropout:
        activation = np.maximum(activation, 0)
    weights = ((activation > 0) | dropout) * kernel  # the gradient at each position, times P
    expected = np.maximum((weights.mean(axis=(1, 2))[:, None, None, :] / SIDE ** 2 * activation).sum(-1), 0)
    assert expected.max(axis=(1, 2)).min() > 0
    np.testing.assert_allclose(ex.heat_maps, expected / expected.max(axis=(1, 2), keepdims=True), atol=1e-5)
    np.testing.assert_array_equal(ex.classes, np.ones(4))


def test_grad_cam_is_the_same_whichever_kernels_compute_the_convolutions(top_left_run):
    run, test = top_left_run
    xla = create_state(run.model, optax.sgd(0.1), run.results["input_shape"], 0, "xla")
    xla = xla.replace(params=run.state.params)
    with_xla = plots.grad_cam(dataclasses.replace(run, state=xla), test.images[:16])
    default = plots.grad_cam(run, test.images[:16])  # train.kernels='auto': on a CPU, cnn/kernels' convolutions
    np.testing.assert_allclose(with_xla.heat_maps, default.heat_maps, atol=1e-4)
    np.testing.assert_allclose(with_xla.saliency, default.saliency, atol=1e-4)


def test_grad_cam_takes_one_image_and_a_class_per_image_and_refuses_a_bad_class(top_left_run):
    run, test = top_left_run
    one = plots.grad_cam(run, test.images[0])
    assert one.heat_maps.shape == (1, SIDE, SIDE)
    both = plots.grad_cam(run, test.images[:2], class_index=[0, 1])
    np.testing.assert_array_equal(both.classes, [0, 1])
    with pytest.raises(ConfigError, match=r"class_index=5 must be a class number from 0 to 1"):
        plots.grad_cam(run, test.images[:2], class_index=5)
    with pytest.raises(ConfigError, match=r"takes inputs shaped \(16, 16, 1\)"):
        plots.grad_cam(run, np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(ConfigError, match=r"takes uint8 pixels as the dataset holds them, not float32"):
        plots.grad_cam(run, np.zeros((2, SIDE, SIDE, 1), np.float32))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """configs/digits.py (a Sequential) trained for one epoch, without pictures: (workdir, TrainResult, Dataset)."""
    config = cnn.load_config(os.path.join(REPO, "configs", "digits.py"))
    config.train.num_epochs, config.train.pictures = 1, False
    workdir = str(tmp_path_factory.mktemp("digits"))
    run = cnn.train_and_evaluate(config, workdir)
    return workdir, run, run.dataset


def test_grad_cam_on_a_sequential_spec_model(digits):
    _, run, dataset = digits
    images = dataset.test.images[:5]
    ex = plots.grad_cam(run, images)
    assert (ex.layer, ex.taken_at) == ("conv2d_1", "the input of max_pooling2d")  # after the ReLU
    assert ex.heat_maps.shape == ex.saliency.shape == (5, 8, 8)
    np.testing.assert_array_equal(ex.classes, cnn.plots.probabilities(run, images).argmax(-1))
    np.testing.assert_allclose(ex.heat_maps.max(axis=(1, 2)), 1.0, atol=1e-6)  # a trained model lights something
    fig = plots.explain(run, images[:2], explanation=ex.part(slice(0, 2)))
    titles = [sub._suptitle.get_text() for sub in fig.subfigs]
    assert titles == [f"Image {i + 1}: predicted {run.class_names[c]} ({ex.probabilities[i, c]:.1%})"
                      for i, c in enumerate(ex.classes[:2])]


def _untrained(layers_or_model, input_shape, num_classes=3) -> TrainResult:
    model = cnn.build_model(layers_or_model) if isinstance(layers_or_model, (list, tuple)) else layers_or_model
    state = create_state(model, optax.sgd(0.1), input_shape, 0)
    return TrainResult(state=state, model=model, history=[], class_names=[str(c) for c in range(num_classes)],
                       results={"input_shape": list(input_shape)})


def test_grad_cam_on_a_residual_preset_takes_its_last_blocks_convolution():
    run = _untrained(cnn.presets.expand("resnet20", 3), (16, 16, 3))
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    ex = plots.grad_cam(run, images)
    names = list(plots.activations(run, images[:1]))
    assert ex.layer == names[-1] and ex.layer.startswith("residual_block_8/")  # conv 2 of the 9th block
    assert ex.taken_at == "the output of residual_block_8"  # after the block's batch norm, shortcut sum and ReLU
    assert ex.heat_maps.shape == ex.saliency.shape == (2, 16, 16)
    assert np.isfinite(ex.heat_maps).all() and ex.saliency.max() == pytest.approx(1.0)


def test_grad_cam_of_a_series_model_is_a_curve_along_the_series():
    run = _untrained(cnn.presets.expand("fcn", 3), (64, 1))
    series = np.random.default_rng(0).normal(size=(2, 64, 1)).astype(np.float32)
    ex = plots.grad_cam(run, series)
    assert ex.heat_maps.shape == ex.saliency.shape == (2, 64)
    assert plots.explain(run, series, explanation=ex) is not None


def test_a_model_without_convolutions_is_one_line():
    run = _untrained(["Flatten()", "Dense(3)"], (8, 8, 1))
    with pytest.raises(ConfigError, match="no convolution layer") as caught:
        plots.grad_cam(run, np.zeros((1, 8, 8, 1), np.uint8))
    assert "\n" not in str(caught.value)


def _visualize(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "cnn.visualize", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=180)


def test_visualize_explain_writes_a_picture_per_image_file(digits, tmp_path):
    workdir, _, dataset = digits
    path = tmp_path / "digit.png"
    Image.fromarray(dataset.test.images[0][..., 0]).resize((64, 64)).save(path)
    done = _visualize(f"--workdir={workdir}", "--explain", str(path))
    assert done.returncode == 0, done.stderr
    written = os.path.join(workdir, "pictures", "digit_explained.png")
    assert done.stdout.strip() == written
    with Image.open(written) as picture:
        assert picture.format == "PNG" and picture.width >= 600
        assert len(picture.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # drawn, not blank


def test_visualize_explain_refuses_a_missing_or_undecodable_file_in_one_line(digits, tmp_path):
    from cnn.cli.visualize import explain

    workdir, _, _ = digits
    missing = _visualize(f"--workdir={workdir}", "--explain", str(tmp_path / "nowhere.png"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "nowhere.png: no such file" in missing.stderr
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"broken.png: not an image file") as caught:  # the command's error line
        explain(workdir, [str(broken)], out=str(tmp_path))
    assert "\n" not in str(caught.value) and not list(tmp_path.glob("*_explained.png"))


def test_visualize_explain_refuses_a_run_that_takes_no_images(tmp_path):
    from cnn.cli.visualize import explain

    config = cnn.load_config(os.path.join(REPO, "configs", "series.py"))
    config.data.max_length, config.model.layers = 32, ("Conv1D(4, 3)", "GlobalAveragePooling1D()", "Dense(4)")
    config.train.num_epochs, config.train.pictures = 1, False
    cnn.train_and_evaluate(config, str(tmp_path / "series"))
    image = tmp_path / "image.png"
    Image.new("L", (8, 8)).save(image)
    with pytest.raises(ConfigError, match=r"takes inputs shaped \(32, 1\) \(series or token ids\), not images; "
                                          r"explain such inputs from a notebook: cnn.plots.explain"):
        explain(str(tmp_path / "series"), [str(image)])

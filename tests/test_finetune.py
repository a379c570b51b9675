"""Fine-tuning (cnn/train/finetune.py): model.pretrained, train.freeze_epochs, optimizer.backbone_lr_scale.

Real pictures made offline: scikit-learn's digits upscaled to 16x16 RGB PNGs
in class folders. A small Sequential with batch norm is trained on all ten
digits once (the "pretrained" run); its weights are saved as a Keras 3
`.weights.h5` and fine-tuned on four digits with a new head, from the
command line, and warm-started from the run's workdir in a notebook. A Keras
MobileNetV2 file fills the `mobilenet_v2` preset through the same path.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import h5py
import jax
import numpy as np
import optax
import pytest
from PIL import Image

import cnn
from cnn.models import weights
from cnn.models.head import head_layer
from cnn.train import finetune
from conftest import REPO

BODY = ("Conv2D(16, 3, padding='same')", "BatchNormalization(momentum=0.9)", "Activation('relu')", "MaxPooling2D(2)",
        "Conv2D(32, 3, padding='same', activation='relu')", "GlobalAveragePooling2D()")
HEAD = "dense"  # the last Dense: the head the specs' weighted layers end with


def _digit_folder(root: pathlib.Path, classes, size: int = 16) -> str:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for i, (image, label) in enumerate(zip(images[:900], digits.target[:900])):
        if label in classes:
            folder = root / f"digit{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).resize((size, size), Image.BILINEAR).convert("RGB").save(folder / f"{i}.png")
    return str(root)


def _config(path: str, classes: int, **fields):
    config = cnn.load_config(str(REPO / "configs" / "finetune.py"))
    config.data.path, config.data.image_size, config.data.flip = path, (16, 16), False
    config.model.preset, config.model.layers, config.model.pretrained = None, (*BODY, f"Dense({classes})"), None
    config.optimizer.backbone_lr_scale, config.train.freeze_epochs, config.optimizer.learning_rate = 1.0, 0, 1e-2
    config.train.num_epochs, config.train.batch_size, config.train.pictures = 3, 32, False
    for key, value in fields.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def _save_keras3(variables: dict, path) -> None:
    """`variables` as Keras 3's model.save_weights writes them: layers/<name>/vars/<i>, Keras' order."""
    with h5py.File(path, "w") as f:
        for name, arrays in weights.as_layers(variables).items():
            group = f.create_group(f"layers/{name}/vars")
            for i, array in enumerate(arrays):
                group[str(i)] = array


def _checkpoint(workdir, step: int) -> dict:
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    item_handlers=ocp.StandardCheckpointHandler())
    try:
        arrays = manager.restore(step)
    finally:
        manager.close()
    return jax.tree_util.tree_map(np.asarray, {"params": arrays["params"], "batch_stats": arrays["batch_stats"]})


def _equal(a, b) -> bool:
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _without(tree: dict, name: str) -> dict:
    return {k: v for k, v in tree.items() if k != name}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The "pretrained" run on all ten digits, its weights saved as a Keras file, and a four-digit folder."""
    root = tmp_path_factory.mktemp("finetune")
    config = _config(_digit_folder(root / "ten", range(10)), 10, optimizer__schedule="warmup_cosine",
                     train__num_epochs=20)
    run = cnn.train_and_evaluate(config, str(root / "ten-run"))
    assert run.results["test_accuracy"] > 0.8
    _save_keras3(run.state.variables(), root / "ten.weights.h5")
    return {"root": root, "workdir": str(root / "ten-run"), "file": str(root / "ten.weights.h5"),
            "four": _digit_folder(root / "four", range(4)), "variables": _checkpoint(root / "ten-run",
                                                                                    run.results["steps"])}


@pytest.fixture(scope="module")
def frozen_run(source):
    """A warm start from the ten-digit workdir on four digits: three frozen epochs, then two of everything."""
    workdir = source["root"] / "frozen"
    config = _config(source["four"], 4, model__pretrained=source["workdir"], train__freeze_epochs=3,
                     train__num_epochs=5)
    return workdir, cnn.train_and_evaluate(config, str(workdir))


def test_the_command_line_fine_tunes_a_weight_file_with_a_new_head(source, tmp_path):
    config_file = tmp_path / "small.py"
    config_file.write_text(f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\nfrom test_finetune import "
                           "_config\n\ndef get_config():\n    return _config(None, 4)\n")
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cnn.main", f"--config={config_file}", f"--workdir={workdir}",
                           f"--config.data.path={source['four']}", f"--config.model.pretrained={source['file']}",
                           "--config.train.freeze_epochs=2", "--config.optimizer.backbone_lr_scale=0.5",
                           "--config.train.num_epochs=6"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model.pretrained: 8 tensors loaded from {source['file']} (keras3); left at their initial values: " \
           f"{HEAD}/kernel, {HEAD}/bias; data.preprocessing=None" in proc.stdout, proc.stdout
    results = json.loads((workdir / "results.json").read_text())
    assert results["test_accuracy"] > 0.6, results  # four classes: chance is 0.25


def test_freezing_leaves_the_backbone_bitwise_then_trains_it(source, frozen_run):
    workdir, run = frozen_run
    steps = run.results["steps"] // 5 * 3  # the frozen epochs'
    start, first, second = source["variables"], _checkpoint(workdir, steps), _checkpoint(workdir, steps + steps // 3)
    for collection in ("params", "batch_stats"):  # the workdir's weights, its batch-norm statistics included
        assert _equal(_without(first[collection], HEAD), _without(start[collection], HEAD)), collection
        assert not _equal(_without(second[collection], HEAD), _without(start[collection], HEAD)), collection
    assert first["params"][HEAD]["kernel"].shape == (32, 4) != start["params"][HEAD]["kernel"].shape
    assert not _equal(first["params"][HEAD], second["params"][HEAD])
    # Chance is 0.25; the frozen epochs' head got 0.44-0.6 on the CPUs and kernels tried, so the margins are wide.
    assert run.history[2]["test_accuracy"] > 0.35
    # Unfrozen, the whole net learns: the train loss falls well below the frozen head's (1.19 to 0.67 on every CPU
    # tried). Held-out accuracy swings after the unfreeze, as batch norm's running statistics trail weights moving at
    # lr 1e-2: 0.58 in one CI run, 0.86 on a Zen 4, from the same train loss. So it only has to stay well above chance.
    assert run.history[4]["train_loss"] < 0.8 * run.history[2]["train_loss"], run.history
    assert run.results["test_accuracy"] > 0.45, run.results
    loaded = cnn.load_run(str(workdir))  # its optimizer state (the head's and the backbone's) restores too
    final = _checkpoint(workdir, run.results["steps"])["params"]
    assert _equal(jax.tree_util.tree_map(np.asarray, loaded.state.params), final)


def test_a_backbone_learning_rate_of_zero_equals_freezing(source, frozen_run, tmp_path):
    workdir, run = frozen_run
    config = _config(source["four"], 4, model__pretrained=source["workdir"], optimizer__backbone_lr_scale=0.0,
                     train__num_epochs=3)
    zero = cnn.train_and_evaluate(config, str(tmp_path / "zero"))
    steps = zero.results["steps"]
    assert steps == run.results["steps"] // 5 * 3
    zeroed, frozen = _checkpoint(tmp_path / "zero", steps), _checkpoint(workdir, steps)
    # The backbone is bitwise the same (neither run moves it); the head trains the same way in two differently
    # compiled programs (set_to_zero against a masked optimizer), so XLA may fuse, and round, its sums differently.
    assert _equal(_without(zeroed["params"], HEAD), _without(frozen["params"], HEAD))
    assert _equal(zeroed["batch_stats"], frozen["batch_stats"])
    for a, b in zip(jax.tree_util.tree_leaves(zeroed["params"][HEAD]), jax.tree_util.tree_leaves(frozen["params"][HEAD])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_run_resumed_while_frozen_switches_at_the_same_step_and_ends_the_same(source, frozen_run, tmp_path):
    workdir, run = frozen_run
    config = _config(source["four"], 4, model__pretrained=source["workdir"], train__freeze_epochs=3,
                     train__num_epochs=5, train__checkpoint_every_steps=4)

    def stop(record):
        if record["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cnn.train_and_evaluate(config, str(tmp_path / "resumed"), on_epoch_end=stop)
    steps_per_epoch = run.results["steps"] // 5
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(3 * steps_per_epoch))  # resume mid-epoch, frozen
    resumed = cnn.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert _equal(_checkpoint(tmp_path / "resumed", run.results["steps"]), _checkpoint(workdir, run.results["steps"]))
    assert [r["test_accuracy"] for r in resumed.history] == [r["test_accuracy"] for r in run.history]


def test_a_keras_file_without_its_top_fills_a_backbone_preset_and_sets_its_preprocessing(tmp_path):
    """As with keras.applications' *_notop.h5 files; the state is made without compiling MobileNetV2's init (a
    minute on 2 cores): the training path around it is the Sequential's above."""
    pytest.importorskip("tensorflow")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    keras = pytest.importorskip("keras")
    from keras.src.legacy.saving import legacy_h5_format

    notop = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, include_top=False)
    path = tmp_path / "mobilenet_v2_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, notop)
    config = _config(None, 4, model__preset="mobilenet_v2(alpha=0.35)", model__layers=(),
                     model__pretrained=str(path))
    model = cnn.models.build_model(config.model, 4)
    shapes = jax.eval_shape(cnn.models.adapt(model).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3),
                                                                                                   np.float32))
    fresh = jax.tree_util.tree_map(lambda leaf: np.full(leaf.shape, 0.5, leaf.dtype), shapes)
    state = cnn.train.TrainState.create(apply_fn=None, params=fresh["params"], tx=optax.sgd(0.1),
                                        batch_stats=fresh["batch_stats"], dropout_rng=jax.random.key(0))
    head = finetune.head(config, model, (32, 32, 3))
    config, state, line = finetune.start(config, model, state, head)
    assert head == "predictions" and config.data.preprocessing == "tf"
    assert np.array_equal(state.params["Conv1"]["kernel"], notop.get_layer("Conv1").kernel.numpy())
    assert np.array_equal(state.batch_stats["Conv_1_bn"]["var"], notop.get_layer("Conv_1_bn").moving_variance.numpy())
    assert (state.params["predictions"]["kernel"] == 0.5).all()
    assert line == f"model.pretrained: 260 tensors loaded from {path} (legacy weight file); left at their initial " \
                   "values: predictions/kernel, predictions/bias; data.preprocessing='tf' set, as these weights expect"


@pytest.mark.parametrize("fields, message", [
    ({"train__freeze_epochs": 1}, "train.freeze_epochs=1 needs a pretrained backbone, and model.pretrained is None"),
    ({"optimizer__backbone_lr_scale": -1.0, "model__pretrained": "{file}"},
     r"optimizer.backbone_lr_scale=-1.0 is not valid: expected a number >= 0"),
    ({"model__pretrained": "missing.h5"}, "model.pretrained='missing.h5' does not exist; give a weight file"),
    ({"model__pretrained": "{root}"}, "is a folder but not the workdir of a cnn run with checkpoints"),
    ({"model__pretrained": "{root}/four/digit0/0.png"}, "is not a known weight format"),
    ({"model__pretrained": "{file}", "model__layers": ("Conv2D(8, 3)", "GlobalAveragePooling2D()", "Dense(4)")},
     r"layer 'conv2d' tensor 0 \(the model's conv2d/kernel\) has shape \(3, 3, 3, 16\) in the file but "
     r"\(3, 3, 3, 8\) in the model: the file is for another architecture"),
    ({"model__pretrained": "{file}", "model__preset": "mobilenet_v2", "model__layers": ()},
     "mobilenet_v2 takes images .* of at least 32x32, not 16x16x3; set data.image_size=\\(32, 32\\)"),
])
def test_each_mistake_is_one_line(source, tmp_path, fields, message):
    fields = {k: v.format(**source) if isinstance(v, str) else v for k, v in fields.items()}
    config = _config(source["four"], 4, **fields)
    with pytest.raises(cnn.ConfigError, match=message) as error:
        cnn.train_and_evaluate(config, str(tmp_path / "run"))
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()


def test_the_command_line_says_a_missing_weight_file_in_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cnn.main", "--config=configs/finetune.py",
                           f"--workdir={tmp_path / 'run'}", f"--config.data.path={tmp_path}",
                           f"--config.model.pretrained={tmp_path / 'nowhere.h5'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: model.pretrained={str(tmp_path / 'nowhere.h5')!r} does not exist; give a weight file (a Keras .h5 "
        "such as resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5) or the workdir of a cnn run"], proc.stderr


def test_the_backbone_learning_rate_is_the_heads_times_the_scale_on_the_same_schedule_after_thawing():
    config = cnn.base_config()
    config.optimizer.schedule, config.optimizer.warmup_epochs = "warmup_cosine", 1.0
    config.optimizer.momentum, config.optimizer.backbone_lr_scale = 0.0, 0.25
    tx = cnn.train.make_optimizer(config.optimizer, 4, 5, head="head", freeze_epochs=2)
    params = {"head": {"w": np.ones(3, np.float32)}, "body": {"w": np.ones(3, np.float32)}}
    grads = jax.tree_util.tree_map(lambda p: np.full_like(p, 0.5), params)
    state = tx.init(params)
    for step in range(20):
        updates, state = tx.update(grads, state, params)
        head, body = updates["head"]["w"], updates["body"]["w"]
        if step < 8:  # two frozen epochs of four steps
            assert not body.any() and (head.any() or step == 0)  # the warm-up starts at 0
        else:
            np.testing.assert_allclose(body, 0.25 * head, rtol=1e-6)


class _Net(nn.Module):
    """Your own module: layers named by Flax, batch norm inside, the head last."""

    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
        return nn.Dense(self.num_classes, name="classifier")(x.mean(axis=(1, 2)))


def test_your_own_module_is_filled_by_name_with_a_new_head(tmp_path):
    x = np.zeros((1, 8, 8, 3), np.float32)
    trained = _Net(num_classes=10).init(jax.random.key(1), x)
    trained = jax.tree_util.tree_map(lambda a: np.asarray(a) + 0.25, trained)  # batch statistics too
    _save_keras3(trained, tmp_path / "net.weights.h5")
    model = _Net(num_classes=3)
    fresh = model.init(jax.random.key(0), x)
    head = head_layer(model, (8, 8, 3))
    filled, report = weights.fill(None, fresh, str(tmp_path / "net.weights.h5"), head)
    assert head == "classifier" and report.loaded == 6 and report.left == ["classifier/kernel", "classifier/bias"]
    assert _equal(_without(filled["params"], head), _without(trained["params"], head))
    assert _equal(filled["batch_stats"], trained["batch_stats"])
    assert _equal(filled["params"][head], jax.tree_util.tree_map(np.asarray, fresh["params"][head]))


def test_a_torchvision_file_fills_its_preset_built_in_torchvisions_style_only(tmp_path):
    """model.pretrained with a torchvision state dict goes through the same `fill`: every tensor loads into
    "mobilenet_v2(style='torchvision')"; the Keras-style preset is refused in one line saying what to set."""
    from test_weight_files import STATE_DICTS

    rng = np.random.default_rng(0)
    state = {key: rng.normal(size=shape).astype(dtype) for key, shape, dtype in STATE_DICTS["mobilenet_v2"]}
    path = tmp_path / "mobilenet_v2.safetensors"
    import safetensors.numpy

    safetensors.numpy.save_file(state, path)
    from cnn.models.backbones import MobileNetV2

    module = MobileNetV2(num_classes=10, style="torchvision")  # the recorded state dict has 10 classes
    variables = weights._init(module, (32, 32, 3), shapes_only=True)
    filled, report = weights.fill("mobilenet_v2(style='torchvision')", variables, str(path), "predictions")
    assert report.layout == "safetensors" and report.left == []
    assert report.loaded == sum(not k.endswith("num_batches_tracked") for k in state)
    np.testing.assert_array_equal(filled["params"]["predictions"]["bias"], state["classifier.1.bias"])
    with pytest.raises(cnn.ConfigError, match=r"fit mobilenet_v2\(style='torchvision'\), not style='keras': set "
                                              r"model.preset=\"mobilenet_v2\(style='torchvision'\)\"$"):
        weights.fill("mobilenet_v2", variables, str(path), "predictions")

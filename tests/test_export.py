"""Export: each format loaded in its own runtime gives the probabilities prediction gives, at two batch sizes.

Three models: digits (convolutions, max pooling, dense), one with batch norm
and data.mean/std (scaling that must travel inside the file), and a 1-D
convolution on float series. TensorFlow is imported once, for the module.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import cnn
from cnn import inference
from cnn.inference import export as export_lib
from conftest import CONFIGS, REPO

BATCHES = (1, 7)


def _train(workdir, config_name: str, layers: tuple[str, ...], **data) -> tuple[str, cnn.TrainResult]:
    config = cnn.load_config(str(CONFIGS / f"{config_name}.py"))
    config.model.layers = layers
    config.train.num_epochs = 1
    for key, value in data.items():
        config.data[key] = value
    return str(workdir), cnn.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def runs(digits_run, tmp_path_factory):
    """name -> (workdir, TrainResult, test inputs): digits, batch norm with mean/std, and a 1-D convolution."""
    base = tmp_path_factory.mktemp("export-runs")
    digits_dir, digits, dataset = digits_run
    norm_dir, norm = _train(base / "batch-norm", "digits",
                            ("Conv2D(8, 3)", "BatchNormalization()", "Activation('relu')", "MaxPooling2D(2)",
                             "Flatten()", "Dense(10)"), mean=(0.3,), std=(0.4,))
    series_dir, series = _train(base / "series", "series",
                                ("Conv1D(8, 5, activation='relu', padding='same')", "MaxPooling1D(2)",
                                 "Conv1D(8, 3, activation='relu')", "GlobalAveragePooling1D()", "Dense(4)"),
                                max_length=32)
    return {"digits": (digits_dir, digits, dataset.test.images[:max(BATCHES)]),
            "batch_norm": (norm_dir, norm, norm.dataset.test.images[:max(BATCHES)]),
            "series": (series_dir, series, series.dataset.test.images[:max(BATCHES)])}


def _run_stablehlo(path, x):
    import jax

    with open(path, "rb") as f:
        return np.asarray(jax.export.deserialize(f.read()).call(x))


def _run_savedmodel(path, x):
    import tensorflow as tf

    return tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(x))["probabilities"].numpy()


def _run_tflite(path, x):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=path)
    (given,), (taken,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(given["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(given["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(taken["index"])


def _run_onnx(path, x):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    return session.run(["probabilities"], {"images": x})[0]


RUNTIMES = {"stablehlo": (_run_stablehlo, 1e-5), "savedmodel": (_run_savedmodel, 1e-5),
            "tflite": (_run_tflite, 1e-4), "onnx": (_run_onnx, 1e-5)}


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
@pytest.mark.parametrize("format", export_lib.FORMATS)
def test_each_format_gives_prediction_s_probabilities_in_its_own_runtime(runs, format, tmp_path):
    load_and_run, tolerance = RUNTIMES[format]
    for name, (workdir, run, inputs) in runs.items():
        path = str(tmp_path / f"{name}.{format}")
        source = workdir if name == "digits" else run  # a workdir, or a notebook's TrainResult
        info = export_lib.export(source, format, path)
        assert info == json.loads(open(path + ".json").read())
        assert info["class_names"] == run.class_names and info["input"]["shape"] == [None, *inputs.shape[1:]]
        assert info["input"]["dtype"] == inputs.dtype.name and info["compute_dtype"] == "float32"
        assert info["workdir"] == (os.path.abspath(workdir) if name == "digits" else None)
        for n in BATCHES:
            x = np.ascontiguousarray(inputs[:n])
            expected = inference.probabilities(run, x)
            got = load_and_run(path, x)
            assert got.shape == (n, len(run.class_names)) and got.dtype == np.float32
            np.testing.assert_allclose(got, expected, atol=tolerance, err_msg=f"{name}, batch of {n}")


def _custom_calls(lowered_text: str) -> set[str]:
    return set(re.findall(r"custom_call @(\w+)", lowered_text)) - {"shape_assertion"}  # jax.export's own check


def test_the_export_has_no_custom_calls_whatever_train_kernels_was(runs):
    """The oneDNN and CPU fast paths stay out, even when the run's state computes through oneDNN: the graph is
    plain StableHLO, which converters take."""
    import dataclasses

    import jax

    from cnn import kernels
    from cnn.kernels import onednn
    from cnn.train import probabilities_fn

    _, run, inputs = runs["digits"]
    if onednn.available():
        run = dataclasses.replace(run, state=run.state.replace(apply_fn=kernels.apply_fn(run.model, "onednn")))
        assert _custom_calls(probabilities_fn(run.recipe).lower(run.state, inputs).as_text())  # what export avoids
    model = export_lib.exportable(run)
    text = jax.export.export(jax.jit(model.bound()))(model.input_spec()).mlir_module()
    assert "stablehlo.convolution" in text and _custom_calls(text) == set()


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_int8_tflite_reports_the_test_accuracy_it_costs(runs, tmp_path):
    _, run, inputs = runs["digits"]
    path = str(tmp_path / "digits-int8.tflite")
    info = export_lib.export(run, "tflite", path, quantize="int8")
    assert info == json.loads(open(path + ".json").read())
    assert info["quantize"] == "int8" and info["test_accuracy"] == pytest.approx(run.results["test_accuracy"])
    assert 0.5 < info["quantized_test_accuracy"] <= 1
    assert info["accuracy_drop"] == pytest.approx(info["test_accuracy"] - info["quantized_test_accuracy"])
    quantized = _run_tflite(path, np.ascontiguousarray(inputs))
    assert np.mean(quantized.argmax(-1) == inference.probabilities(run, inputs).argmax(-1)) >= 5 / 7
    import tensorflow as tf

    weights = tf.lite.Interpreter(model_path=path).get_tensor_details()
    assert any(t["dtype"] == np.int8 and "conv2d" in t["name"] for t in weights)  # its convolutions really are int8


def _cnn_export(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cnn", "export", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def test_bad_input_is_one_line_status_2_and_writes_nothing(runs, tmp_path, config_path):
    workdir, run, _ = runs["digits"]
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.json").write_text(cnn.load_config(config_path("digits")).to_json_best_effort())
    taken = tmp_path / "taken.onnx"
    taken.write_text("keep me")
    proc = _cnn_export(f"--workdir={untrained}", "--format=onnx", f"--output={tmp_path / 'a.onnx'}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: workdir={str(untrained)!r} has no checkpoint yet; train first")
    cases = {  # the command line turns each ConfigError into the same one line and status 2
        "format='keras' is unknown; the formats: stablehlo, savedmodel, tflite, onnx": ("keras", "b.keras", {}),
        f"{taken} exists; pass --overwrite": ("onnx", "taken.onnx", {}),
        "quantize='int8' is not valid: only --format=tflite quantises": ("onnx", "c.onnx", {"quantize": "int8"}),
    }
    for message, (format, name, options) in cases.items():
        with pytest.raises(cnn.ConfigError, match=re.escape(message)):
            export_lib.export(workdir, format, str(tmp_path / name), **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx", "untrained"]
    assert taken.read_text() == "keep me"


HIDE = '''
import importlib.abc, importlib.machinery, sys

class _Hide(importlib.abc.MetaPathFinder):
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        return None if name.partition(".")[0] in ("tensorflow", "jax2onnx") else self.inner.find_spec(name, path, target)

    def invalidate_caches(self):
        self.inner.invalidate_caches()

sys.meta_path[:] = [_Hide(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


def test_a_missing_converter_names_the_extra_to_install(runs, tmp_path):
    """In a Python where TensorFlow and jax2onnx are not installed (hidden as tests/conftest.py hides TensorFlow)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")]))}
    workdir, out = runs["digits"][0], tmp_path / "out"
    for format, extra, package in [("savedmodel", "tfds", "tensorflow"), ("onnx", "export", "jax2onnx")]:
        proc = _cnn_export(f"--workdir={workdir}", f"--format={format}", f"--output={out / format}", env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == (f"error: --format={format} needs {package}, which is not installed: pip install "
                               f"'cnn[{extra}]'\n")
    assert not out.exists()


def test_a_layer_a_converter_cannot_take_is_named_with_the_formats_that_can(runs, tmp_path, monkeypatch):
    """No cnn layer fails a converter here, so jax2onnx is made to refuse max pooling: the error names that layer
    (found by converting each layer alone) and the formats that took it, and nothing is written."""
    import jax2onnx

    real = jax2onnx.to_onnx

    def refuses_max_pooling(fn, inputs, **kwargs):
        import jax

        if "reduce_window_max" in str(jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((1, *inputs[0].shape[1:]),
                                                                              inputs[0].dtype))):
            raise NotImplementedError("no ONNX lowering for reduce_window_max")
        return real(fn, inputs, **kwargs)

    monkeypatch.setattr(jax2onnx, "to_onnx", refuses_max_pooling)
    _, run, _ = runs["digits"]
    path = tmp_path / "digits.onnx"
    with pytest.raises(cnn.ConfigError) as error:
        export_lib.export(run, "onnx", str(path))
    assert str(error.value) == ("--format=onnx: the converter cannot take model.layers[2]='MaxPooling2D(2)' (no ONNX "
                                "lowering for reduce_window_max); formats that can: stablehlo, savedmodel, tflite")
    assert list(tmp_path.iterdir()) == []

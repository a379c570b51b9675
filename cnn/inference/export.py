"""A trained run's model, exported for runtimes without Python's cnn: StableHLO, SavedModel, TFLite or ONNX.

    cnn.inference.export("runs/mnist", "onnx", "mnist.onnx")  # or the TrainResult of cnn.train_and_evaluate

What is exported is the function prediction computes (`class_probabilities`):
raw inputs `images` (uint8 pixels (N, H, W, C), int32 token ids or float32
series, N free) to `probabilities` (N, classes) in float32, with the recipe's
scaling (to [0, 1], data.mean/std) inside, so a deployed model takes pixels
as `cnn predict` does. It is traced with train.kernels='xla': the oneDNN and
CPU fast paths (cnn/kernels) would put custom calls into the graph, which no
converter takes. Beside the file, OUTPUT.json records the class names, the
input's shape and dtype, the cnn version and the source workdir.

The converters are the maintained ones: `jax.export` (StableHLO), `jax2tf`
(SavedModel), TFLite's converter on that SavedModel, `jax2onnx`. TensorFlow
and jax2onnx are optional, imported only by the formats that need them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnn import kernels
from cnn.errors import ConfigError
from cnn.inference.predict import as_run, input_dtype, input_shape, probabilities
from cnn.train import TrainResult, class_probabilities

FORMATS = ("stablehlo", "savedmodel", "tflite", "onnx")
QUANTIZE = ("int8",)
INPUT, OUTPUT = "images", "probabilities"
STABLEHLO_PLATFORMS = ("cpu", "cuda")  # stablehlo and savedmodel are lowered for both: they run on either
# The packages each format needs to be written, and the extra that installs them.
_NEEDS = {"savedmodel": (("tensorflow", "tfds"),), "tflite": (("tensorflow", "tfds"),),
          "onnx": (("jax2onnx", "export"), ("onnx", "export"))}
_REPRESENTATIVE = 200  # training examples that calibrate int8 quantisation
_FLOAT_OPS = ("REDUCE_MAX", "SUB", "EXP", "SUM", "DIV")  # the softmax, kept in float32 in an int8 TFLite model


@dataclasses.dataclass(frozen=True)
class Model:
    """What every format converts: `fn(variables, images)` and its float32 variables, for inputs shaped `shape`."""

    fn: Callable[[dict, jax.Array], jax.Array]
    variables: dict
    shape: tuple[int, ...]  # one input's, without the batch
    dtype: np.dtype
    specs: tuple[str, ...]  # the model's layers, to name the one a converter cannot take
    probe: bool = False  # one layer alone, converted to find which layer a converter cannot take

    def bound(self) -> Callable[[jax.Array], jax.Array]:
        """`fn` with the variables closed over: they become the graph's constants."""
        return lambda images: self.fn(self.variables, images)

    def input_spec(self) -> jax.ShapeDtypeStruct:
        """The input with a symbolic batch size N."""
        dims = ", ".join(["N", *map(str, self.shape)])
        return jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims), self.dtype)


def exportable(run: TrainResult) -> Model:
    """The run's probabilities function in float32, on plain XLA layers (no custom calls)."""
    recipe = dataclasses.replace(run.recipe, compute_dtype="float32")
    fn = functools.partial(class_probabilities, kernels.apply_fn(run.model, "xla"), recipe=recipe)
    variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), run.state.variables())
    return Model(fn, variables, input_shape(run), input_dtype(run), tuple(run.model.layers))


def export(source: TrainResult | str | os.PathLike, format: str, output: str | os.PathLike, *,
           overwrite: bool = False, quantize: str | None = None) -> dict[str, Any]:
    """Writes the model of `source` (a workdir or a TrainResult) to `output` in `format`, and `output`.json.

    Every check (format, output path, installed converter, checkpoint) runs
    before anything is written, and the file is converted in a temporary
    folder first, so a failure leaves nothing behind. `quantize='int8'`
    (TFLite only) quantises after training, calibrated on training examples,
    and reports the test accuracy it costs. Returns what OUTPUT.json holds.
    """
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is unknown; the formats: {', '.join(FORMATS)}")
    if quantize is not None and (quantize not in QUANTIZE or format != "tflite"):
        raise ConfigError(f"quantize={quantize!r} is not valid: only --format=tflite quantises, with "
                          f"quantize={' or '.join(map(repr, QUANTIZE))}")
    output = os.path.abspath(os.fspath(output))
    targets = [output, output + ".json"]
    if not overwrite:
        for path in targets:
            if os.path.lexists(path):
                raise ConfigError(f"{path} exists; pass --overwrite (overwrite=True) to replace it, or another "
                                  "--output")
    require(format)
    run = as_run(source)
    model = exportable(run)
    info = describe(run, model, format, source)
    with tempfile.TemporaryDirectory(prefix="cnn-export-") as tmp:
        staged = os.path.join(tmp, os.path.basename(output))
        if quantize:
            info.update(quantize_tflite(run, model, source, staged, tmp))
        else:
            WRITERS[format](model, staged, tmp)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        for path in targets:
            _remove(path)
        shutil.move(staged, output)
    with open(output + ".json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return info


def require(format: str) -> None:
    """A one-line error naming the extra to install when a package `format` needs is missing."""
    for package, extra in _NEEDS.get(format, ()):
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"--format={format} needs {package}, which is not installed: pip install 'cnn[{extra}]'")


def describe(run: TrainResult, model: Model, format: str, source) -> dict[str, Any]:
    """OUTPUT.json: how to call the file and what its outputs mean, and where it came from."""
    try:
        version = importlib.metadata.version("cnn")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "format": format,
        "input": {"name": INPUT, "shape": [None, *model.shape], "dtype": np.dtype(model.dtype).name},
        "output": {"name": OUTPUT, "shape": [None, len(run.class_names)], "dtype": "float32"},
        "class_names": list(run.class_names),
        "preprocessing": _preprocessing(run, model),
        "compute_dtype": "float32",
        "trained_compute_dtype": run.recipe.compute_dtype,
        "tta": run.recipe.tta,  # eval.tta: 'flip' averages each image's and its mirror's probabilities, inside the file
        "cnn_version": version,
        "workdir": os.path.abspath(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else None,
    }


def _preprocessing(run: TrainResult, model: Model) -> str:
    if model.dtype != np.uint8:
        return "none: inputs go to the first layer as they are"
    scaled = "pixels / 255"
    if run.recipe.mean is not None:
        scaled += f", then (x - {list(run.recipe.mean)}) / {list(run.recipe.std)}"
    return f"inside the model: {scaled}"


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# --- The formats ------------------------------------------------------------------------------------------------


def write_stablehlo(model: Model, path: str, tmp: str) -> None:
    """`jax.export`'s serialized module, for CPUs and NVIDIA GPUs: `jax.export.deserialize(bytes).call(images)`."""
    export = lambda m: jax.export.export(jax.jit(m.bound()), platforms=STABLEHLO_PLATFORMS)(m.input_spec())
    exported = _converting("stablehlo", model, export)
    with open(path, "wb") as f:
        f.write(exported.serialize())


def write_savedmodel(model: Model, path: str, tmp: str, platforms: tuple[str, ...] = STABLEHLO_PLATFORMS) -> None:
    """jax2tf's function in a SavedModel folder, the variables as tf.Variables, signature 'serving_default'.

    jax2tf puts the StableHLO module inside the graph (an XlaCallModule op), lowered for `platforms`."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    def save(m: Model) -> None:
        module = tf.Module()
        module.variables_ = tf.nest.map_structure(tf.Variable, m.variables)
        dims = ", ".join(["N", *map(str, m.shape)])
        convert = jax2tf.convert(m.fn, polymorphic_shapes=[None, f"({dims})"], with_gradient=False,
                                 native_serialization_platforms=platforms)

        @tf.function(input_signature=[tf.TensorSpec([None, *m.shape], tf.as_dtype(m.dtype), name=INPUT)],
                     autograph=False)
        def serve(images):
            return {OUTPUT: convert(module.variables_, images)}

        module.serve = serve
        tf.saved_model.save(module, path, signatures={"serving_default": serve})

    _converting("savedmodel", model, save)


def write_tflite(model: Model, path: str, tmp: str) -> None:
    """The SavedModel converted by `tf.lite.TFLiteConverter.from_saved_model`."""
    with open(path, "wb") as f:
        f.write(_converting("tflite", model, lambda m: tflite_bytes(m, tmp)))


def tflite_bytes(model: Model, tmp: str, representative: np.ndarray | None = None) -> bytes:
    """A TFLite flatbuffer of `model`; int8-quantised, calibrated on `representative` inputs, when given."""
    import tensorflow as tf

    saved = tempfile.mkdtemp(dir=tmp)
    os.rmdir(saved)
    write_savedmodel(model, saved, tmp, platforms=("cpu",))  # TFLite's converter takes one platform's module
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    if representative is None:
        return converter.convert()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    examples = lambda: ([x[None]] for x in representative)
    converter.representative_dataset = examples
    # The softmax stays float: TFLite's int8 DIV refuses a divisor whose stored byte is 0 even where it stands for
    # a non-zero sum, so a fully int8 model fails at its first call. Selective quantisation (TF's debugger) keeps it.
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(_FLOAT_OPS))
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=examples,
                                                         debug_options=options)
    return debugger.get_nondebug_quantized_model()


def write_onnx(model: Model, path: str, tmp: str) -> None:
    """jax2onnx's model, one self-contained file."""
    for name in ("jax2onnx", "onnx_ir"):  # plugins for packages cnn does not use, and their shape-type notes
        logging.getLogger(name).setLevel(logging.ERROR)
    from jax2onnx import to_onnx

    # export_mode='web' keeps the weights inside the .onnx file rather than in a .onnx.data beside it.
    _converting("onnx", model, lambda m: to_onnx(m.bound(), [m.input_spec()], model_name="cnn", input_names=[INPUT],
                                                  output_names=[OUTPUT], return_mode="file", output_path=path,
                                                  export_mode="web"))


WRITERS: dict[str, Callable[[Model, str, str], None]] = {
    "stablehlo": write_stablehlo, "savedmodel": write_savedmodel, "tflite": write_tflite, "onnx": write_onnx}


# --- A converter's failure, traced to a layer -----------------------------------------------------------------------


def _converting(format: str, model: Model, convert: Callable[[Model], Any]) -> Any:
    """`convert(model)`; a converter's failure becomes one line naming the layer it cannot take and the formats
    that can."""
    try:
        return convert(model)
    except ConfigError:
        raise
    except Exception as error:  # converters raise anything: NotImplementedError, TF's ConverterError, ...
        if model.probe:
            raise
        raise ConfigError(_cannot(format, model, convert, error)) from None


def _cannot(format: str, model: Model, convert: Callable[[Model], Any], error: Exception) -> str:
    """Converts each layer alone, first to last, to find the one `convert` fails on, then tries the other formats
    whose packages are installed on that layer."""
    reason = _first_line(error)
    for i, spec in enumerate(model.specs):
        probe = layer_alone(model, i)
        try:
            convert(probe)
        except Exception as layer_error:
            others = [f for f in FORMATS if f != format and _converts(f, probe)]
            can = f"formats that can: {', '.join(others)}" if others else "no installed format can"
            return (f"--format={format}: the converter cannot take model.layers[{i}]={spec!r} "
                    f"({_first_line(layer_error)}); {can}")
    return f"--format={format}: the converter failed on this model ({reason}); --format=stablehlo keeps every layer"


def layer_alone(model: Model, index: int) -> Model:
    """Layer `index` of `model` as a model of its own, with fresh weights, on the input it gets in `model`."""
    from cnn.models import Sequential, output_shape

    shape, dtype = model.shape, (np.int32 if model.dtype == np.int32 else np.float32)  # pixels arrive scaled
    if index:
        shape, dtype = output_shape(Sequential(model.specs[:index]), model.shape)[1:], np.float32
    alone = Sequential((model.specs[index],))
    apply = kernels.apply_fn(alone, "xla")
    variables = apply.init(jax.random.key(0), jnp.zeros((1, *shape), jnp.float32))
    return Model(lambda v, x: apply(v, x, train=False), variables, tuple(shape), np.dtype(dtype), alone.layers, True)


def _converts(format: str, probe: Model) -> bool:
    try:
        require(format)
        with tempfile.TemporaryDirectory(prefix="cnn-export-probe-") as tmp:
            WRITERS[format](probe, os.path.join(tmp, "probe"), tmp)
        return True
    except Exception:
        return False


def _first_line(error: Exception) -> str:
    """The converter's reason in one line: the first line, or the first MLIR diagnostic ('...: error: why')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = next((line.rpartition(" error: ")[2] for line in lines if " error: " in line),
                lines[0] if lines else type(error).__name__)
    return line if len(line) <= 200 else line[:197] + "..."


# --- int8 TFLite ------------------------------------------------------------------------------------------------------


def quantize_tflite(run: TrainResult, model: Model, source, path: str, tmp: str) -> dict[str, Any]:
    """Writes the TFLite file at `path` int8-quantised, calibrated on training inputs, and measures what that costs
    on the test split: the accuracies before and after, for OUTPUT.json."""
    dataset = _dataset(run, source)
    train, test = dataset.train, dataset.test
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(len(train), min(_REPRESENTATIVE, len(train)), replace=False))
    representative = np.asarray(train.images[chosen]).astype(model.dtype)
    content = _converting("tflite", model, lambda m: tflite_bytes(m, tmp, representative))
    with open(path, "wb") as f:
        f.write(content)
    labels = np.asarray(test.labels)
    before = float(np.mean(probabilities(run, np.asarray(test.images)).argmax(-1) == labels))
    after = float(np.mean(tflite_probabilities(content, np.asarray(test.images)).argmax(-1) == labels))
    return {"quantize": "int8", "representative_examples": len(chosen), "test_accuracy": before,
            "quantized_test_accuracy": after, "accuracy_drop": before - after}


def _dataset(run: TrainResult, source):
    """The run's dataset: held by a TrainResult from training, else loaded as its config.json says."""
    from cnn import data as data_lib
    from cnn.run import read_config

    if run.dataset is not None:
        return run.dataset
    if not isinstance(source, (str, os.PathLike)) or run.results.get("dataset") == data_lib.ARRAYS:
        raise ConfigError("quantize='int8' needs the run's training and test inputs, which this run does not hold "
                          "(it trained on arrays); pass the TrainResult of cnn.train_and_evaluate")
    config = read_config(os.fspath(source))
    return data_lib.load_dataset(config.data, config.seed)


def tflite_probabilities(content: bytes, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Runs a TFLite model on `inputs` with TensorFlow's interpreter, `batch_size` at a time."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=content)
    (given,), (taken,) = interpreter.get_input_details(), interpreter.get_output_details()
    out = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size]
        interpreter.resize_tensor_input(given["index"], batch.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(given["index"], batch)
        interpreter.invoke()
        out.append(interpreter.get_tensor(taken["index"]))
    return np.concatenate(out)

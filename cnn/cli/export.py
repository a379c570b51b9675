"""`cnn export --workdir=DIR --format=FORMAT --output=PATH` writes the trained model for another runtime.

    $ cnn export --workdir=runs/mnist --format=onnx --output=mnist.onnx
    wrote mnist.onnx (onnx: images uint8 (N, 28, 28, 1) -> probabilities (N, 10)) and mnist.onnx.json

FORMAT: stablehlo (jax.export's bytes), savedmodel (a folder, signature
serving_default), tflite, onnx. The file takes raw inputs, as `cnn predict`
does after conversion, and gives class probabilities; PATH.json beside it
holds the class names. docs/export.md shows how to run each in its runtime.
"""

from __future__ import annotations

from absl import app, flags

from cnn.cli import FLAGS, Usage, fail, flags_parser, quiet_logging
from cnn.errors import UserError

flags.DEFINE_string("workdir", None, "The workdir of a training run (it holds config.json and checkpoints/).")
flags.DEFINE_string("format", None, "stablehlo, savedmodel, tflite or onnx.")
flags.DEFINE_string("output", None, "The file to write (a folder for savedmodel); PATH.json is written beside it.")
flags.DEFINE_bool("overwrite", False, "Replace PATH and PATH.json if they exist.")
flags.DEFINE_string("quantize", None, "int8: quantise a tflite export after training, calibrated on training "
                    "examples, and report the test accuracy it costs.")
for _name in ("workdir", "format", "output"):
    flags.mark_flag_as_required(_name)
USAGE = Usage(__name__, "--workdir=DIR --format=stablehlo|savedmodel|tflite|onnx --output=PATH [--overwrite] "
              "[--quantize=int8]")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}; {argv[0]} {USAGE.args}")
    quiet_logging()
    from cnn.inference.export import export  # JAX: only once the flags are right

    try:
        info = export(FLAGS.workdir, FLAGS.format, FLAGS.output, overwrite=FLAGS.overwrite, quantize=FLAGS.quantize)
    except UserError as e:
        fail(str(e))
    given, taken = info["input"], info["output"]
    shape = lambda io: "(" + ", ".join("N" if d is None else str(d) for d in io["shape"]) + ")"
    print(f"wrote {FLAGS.output} ({info['format']}: {given['name']} {given['dtype']} {shape(given)} -> "
          f"{taken['name']} {shape(taken)}) and {FLAGS.output}.json", flush=True)
    if "accuracy_drop" in info:
        print(f"int8: test accuracy {info['test_accuracy']:.2%} -> {info['quantized_test_accuracy']:.2%} "
              f"(drop {100 * info['accuracy_drop']:.2f} points)", flush=True)


def command(argv: list[str]) -> None:
    """`argv[0]` names the command as the user typed it, for the usage line."""
    app.run(main, argv=argv, flags_parser=flags_parser(USAGE))

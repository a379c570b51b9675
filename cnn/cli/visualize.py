"""`cnn visualize --workdir=DIR` redraws WORKDIR/plots/ from the newest checkpoint.

Training draws the same pictures when it ends; this is for a run stopped
early, a checkpoint from before the pictures existed, or after changing
them. The test split is loaded as the run's config.json says.

`cnn visualize --workdir=DIR --explain IMAGE [IMAGE ...]` draws where the
model looked in each image file: its Grad-CAM heat map over the last
convolution and its gradient saliency map, for the predicted class (or
--class_index), into WORKDIR/pictures/ (or --out).
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
from absl import app, flags

from cnn import data as data_lib
from cnn import plots
from cnn import workdir as workdir_lib
from cnn.cli import FLAGS, Usage, fail, flags_parser, quiet_logging
from cnn.errors import ConfigError, UserError
from cnn.inference import convert, input_shape, open_image
from cnn.run import load_run, read_config

flags.DEFINE_string("workdir", None, "The workdir of a training run (it holds config.json and checkpoints/).")
flags.DEFINE_integer("num_images", 3, "How many test examples (images, series or texts) to show the feature maps of.")
flags.DEFINE_bool("explain", False, "Explain the image files given after the flags: Grad-CAM and saliency.")
flags.DEFINE_integer("class_index", None, "With --explain: the class to explain (default: the predicted one).")
flags.DEFINE_string("out", None, "With --explain: the folder for the pictures (default: WORKDIR/pictures).")
flags.mark_flag_as_required("workdir")
USAGE = Usage(__name__, "--workdir=DIR [--num_images=3] | --workdir=DIR --explain [--class_index=N] [--out=DIR] "
                        "IMAGE [IMAGE ...]")
PICTURES = "pictures"  # where --explain writes, beside plots/


def visualize(workdir: str, num_images: int = 3) -> list[str]:
    """Loads the run in `workdir` and its test split, and writes every picture; returns the PNG paths."""
    run = load_run(workdir)
    if run.results.get("dataset") == data_lib.ARRAYS:
        raise ConfigError(f"{workdir} was trained on arrays passed to cnn.train_and_evaluate, which the workdir does "
                          "not hold; draw its pictures in the notebook: cnn.plots.write_plots(workdir, "
                          "cnn.load_run(workdir), cnn.from_arrays(...))")
    config = read_config(workdir)
    dataset = data_lib.load_dataset(config.data, config.seed)
    return plots.write_plots(workdir, run, dataset, num_images=num_images)


def explain(workdir: str, paths: list[str], class_index: int | None = None, out: str | None = None) -> list[str]:
    """Writes a picture of where the model looked in each image file (`plots.explain`) to `out` (default
    WORKDIR/pictures/), named after the file; returns the PNG paths. A missing or unreadable file is a
    ConfigError naming it, raised before anything is computed."""
    images = [open_image(path) for path in paths]
    run = load_run(workdir)
    shape = input_shape(run)
    if len(shape) != 3:
        raise ConfigError(f"the run in {workdir} takes inputs shaped {shape} (series or token ids), not images; "
                          f"explain such inputs from a notebook: cnn.plots.explain(cnn.load_run({workdir!r}), inputs)")
    arrays = []
    for path, image in zip(paths, images):  # converted as cnn predict converts them, saying how
        array, notes = convert(image, shape, run.results)
        arrays.append(array)
        for note in notes:
            print(f"note: {path}: {note}", file=sys.stderr, flush=True)
    ex = plots.grad_cam(run, np.stack(arrays), class_index)
    out = out or os.path.join(workdir, PICTURES)
    os.makedirs(out, exist_ok=True)
    written = []
    for i, path in enumerate(paths):
        fig = plots.explain(run, arrays[i], explanation=ex.part(i), names=[os.path.basename(path)])
        name = os.path.splitext(os.path.basename(path))[0]
        target = os.path.join(out, f"{name}_explained.png")
        if target in written:  # two files of one name from different folders
            target = os.path.join(out, f"{name}_{i + 1}_explained.png")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        workdir_lib.write_atomic(target, buffer.getvalue())
        written.append(target)
        print(target, flush=True)
    return written


def main(argv: list[str]) -> None:
    quiet_logging()
    paths = argv[1:]
    if paths and not FLAGS.explain:
        fail(f"unexpected arguments: {' '.join(paths)}; to explain image files add --explain: {argv[0]} {USAGE.args}")
    if FLAGS.explain and not paths:
        fail(f"--explain needs image files after the flags; {argv[0]} {USAGE.args}")
    if FLAGS.num_images < 1:
        fail(f"--num_images={FLAGS.num_images} must be at least 1")
    try:
        if FLAGS.explain:
            explain(FLAGS.workdir, paths, FLAGS.class_index, FLAGS.out)
        else:
            visualize(FLAGS.workdir, FLAGS.num_images)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def command(argv: list[str]) -> None:
    """`argv[0]` names the command as the user typed it, for the usage line."""
    app.run(main, argv=argv, flags_parser=flags_parser(USAGE))

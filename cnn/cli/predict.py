"""`python -m cnn.predict --workdir=DIR IMAGE [IMAGE ...]` prints each image's top classes.

    $ python -m cnn.predict --workdir=runs/mnist seven.png
    note: seven.png: 400x400 RGB: converted to grayscale, inverted (...), resized to 28x28
    seven.png: 7 (98.1%), 2 (1.2%), 1 (0.3%)

Any PNG or JPEG works: it is converted to the model's input and the
conversion is said in a note. A missing or unreadable file is reported in
one line and the others are still predicted; the exit status is then 2.
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags

from cnn.cli import FLAGS, fail, flags_parser, quiet_logging
from cnn.errors import ConfigError
from cnn.inference import INVERT, convert, input_shape, open_image, probabilities, top_classes
from cnn.run import load_run

flags.DEFINE_string("workdir", None, "The workdir of a training run (it holds config.json and checkpoints/).")
flags.DEFINE_integer("top_k", 3, "How many of the most probable classes to print for each image.")
flags.DEFINE_enum("invert", "auto", list(INVERT),
                  "Invert the image's brightness: 'auto' when its background is the opposite of the training "
                  "images' (a black-on-white drawing for MNIST), or always ('yes'), or never ('no').")
flags.DEFINE_bool("frame", True, "When the training images are objects on a plain background (MNIST), crop the "
                  "image to its object and centre it with the same margin; --noframe only resizes.")
flags.mark_flag_as_required("workdir")
USAGE = "usage: python -m cnn.predict --workdir=DIR [--top_k=3] [--invert=auto|yes|no] [--noframe] IMAGE [IMAGE ...]"


def main(argv: list[str]) -> None:
    quiet_logging()
    paths = argv[1:]
    if not paths:
        fail(f"no images given; {USAGE[len('usage: '):]}")
    if FLAGS.top_k < 1:
        fail(f"--top_k={FLAGS.top_k} must be at least 1")
    try:
        run = load_run(FLAGS.workdir)
        shape = input_shape(run)
    except ConfigError as e:
        fail(str(e))
    failed, ready = 0, []
    for path in paths:  # a bad file is reported and the rest still predicted
        try:
            array, notes = convert(open_image(path), shape, run.results, FLAGS.invert, FLAGS.frame)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            failed += 1
            continue
        for note in notes:
            print(f"note: {path}: {note}", file=sys.stderr, flush=True)
        ready.append((path, array))
    if ready:
        probs = probabilities(run, np.stack([array for _, array in ready]))
        for (path, _), pairs in zip(ready, top_classes(probs, run.class_names, FLAGS.top_k)):
            print(f"{path}: " + ", ".join(f"{name} ({p:.1%})" for name, p in pairs), flush=True)
    if failed:
        fail(f"{failed} of {len(paths)} files could not be predicted (see above)")


def command_line() -> None:
    """The command: parses the flags (a mistake is one line plus the usage), then runs `main`."""
    app.run(main, flags_parser=flags_parser(USAGE))


if __name__ == "__main__":
    command_line()

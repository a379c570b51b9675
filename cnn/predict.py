"""Predictions from a trained workdir: image files on the command line, arrays in a notebook.

    python -m cnn.predict --workdir=runs/mnist digit.png photo.jpg [--top_k=3]

    cnn.predict("runs/mnist", images, top_k=3)  # or the TrainResult of cnn.train_and_evaluate
    run = cnn.load_run("runs/mnist")  # the trained state, as train_and_evaluate returns it

`load(workdir)` rebuilds the trained model from config.json and the newest
checkpoint; cnn.visualize uses it too. Any image is converted to what the
model was trained on (size, channels, and a light background inverted when
the training images have dark ones, as a drawing usually does), and each
conversion is said in one line, so a surprising answer can be traced.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn import checkpoint, models
from cnn import data as data_lib
from cnn import train as train_lib
from cnn.config import ConfigError
from cnn.progress import progress

INVERT = ("auto", "yes", "no")


def dataset_info(dataset: data_lib.Dataset) -> dict[str, Any]:
    """What prediction needs from the training data, stored in results.json so it never reloads the data.

    `border_brightness` is the mean pixel (0-255) on the edges of the
    training images: near 0 for MNIST's white-on-black digits, which tells
    prediction to invert a black-on-white drawing.
    """
    images = dataset.train.images
    edges = [images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]] if images.ndim == 4 else [images]
    border = float(np.mean([e.mean(dtype=np.float64) for e in edges]))
    return {"class_names": [str(n) for n in dataset.class_names], "input_shape": [int(v) for v in dataset.input_shape],
            "border_brightness": round(border, 2)}


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (its config.json)."""
    if not os.path.isdir(workdir):
        raise ConfigError(f"workdir={workdir!r} does not exist; pass the --workdir of a training run "
                          "(python -m cnn.main --config=CONFIG --workdir=DIR)")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"workdir={workdir!r} has no config.json, so no training run wrote it; pass the --workdir "
                          "given to python -m cnn.main")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def load(workdir: str) -> train_lib.TrainResult:
    """The trained state of `workdir` (config.json and its newest checkpoint), as `train_and_evaluate` returns it.

    Class names and the input shape come from results.json; a run still
    training has none yet, and then the dataset is loaded to find them.
    """
    config = read_config(workdir)
    results = _read_json(os.path.join(workdir, "results.json")) or {}
    if not {"class_names", "input_shape"} <= results.keys():
        results = {**results, **dataset_info(data_lib.load(config.data))}
    class_names = list(results["class_names"])
    input_shape = tuple(results["input_shape"])
    model = models.build_model(config.model)
    loss = models.check_head(model, input_shape, len(class_names), config.loss)
    # The optimizer gives the checkpoint's structure; its schedule's length does not matter here.
    tx = train_lib.make_optimizer(config.optimizer, 1, config.train.num_epochs)
    fresh = train_lib.create_state(model, tx, input_shape, config.seed, loss, config.data)
    restored = None
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        checkpoints = checkpoint.Checkpoints(workdir)
        try:
            restored = checkpoints.restore(fresh)
        finally:
            checkpoints.close()
    if restored is None:
        raise ConfigError(f"workdir={workdir!r} has no checkpoint yet; train first (python -m cnn.main "
                          f"--config=CONFIG --workdir={workdir}) or pass the workdir of a run that saved one")
    history = []
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        pass
    return train_lib.TrainResult(state=restored[0], model=model, history=history, results=results,
                                 class_names=class_names)


def _as_run(source: train_lib.TrainResult | str | os.PathLike) -> train_lib.TrainResult:
    return load(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else source


def input_shape(run: train_lib.TrainResult) -> tuple[int, ...]:
    """The (height, width, channels) the model takes."""
    if "input_shape" in run.results:
        return tuple(run.results["input_shape"])
    raise ConfigError("this TrainResult does not record its input shape; load the run with cnn.load_run(WORKDIR)")


def probabilities(run: train_lib.TrainResult, images: np.ndarray, batch_size: int = 500,
                  description: str | None = None) -> np.ndarray:
    """Class probabilities (N, classes) for uint8 images already shaped like the training images."""
    state = run.state

    @jax.jit
    def apply(variables, x):
        logits = state.apply_fn(variables, data_lib.preprocess(x, state.mean, state.std), train=False, logits=True)
        if state.loss == "sigmoid_binary_cross_entropy":
            p = jax.nn.sigmoid(logits[:, 0])
            return jnp.stack([1 - p, p], axis=-1)
        return jax.nn.softmax(logits, axis=-1)

    n = len(images)
    batch_size = max(1, min(batch_size, n))
    variables = state.variables()
    starts = range(0, n, batch_size)
    if description:
        starts = progress(starts, len(starts), description, unit="batch")
    out = []
    for start in starts:
        batch = images[start:start + batch_size]
        pad = batch_size - len(batch)  # one shape, one compilation
        if pad:
            batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
        out.append(np.asarray(apply(variables, batch))[:batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, len(run.class_names)), np.float32)


# --- Turning any image into the model's input ---------------------------------


def convert(image, shape: Sequence[int], border_brightness: float | None = None, invert: str = "auto",
            ) -> tuple[np.ndarray, list[str]]:
    """Returns `image` (a PIL image or an array) as uint8 (height, width, channels) of `shape`, and what was done.

    Transparency is flattened onto white, as a viewer shows it; colour and
    grayscale are converted to the model's channels; a light background is
    inverted when the training images had dark ones (`invert='auto'`, from
    `border_brightness`), or always ('yes') or never ('no'); the image is
    padded to the model's aspect ratio with its background, then resized.
    """
    from PIL import Image, ImageOps

    height, width, channels = (int(v) for v in shape)
    if channels not in (1, 3):
        raise ConfigError(f"the model takes {channels}-channel images; only 1 (grayscale) or 3 (RGB) can be made "
                          "from an image file; pass arrays of that shape to cnn.predict instead")
    done = []
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.dtype != np.uint8:
            array = np.asarray(array, np.float64)
            if array.size and array.max() <= 1.0:  # floats in [0, 1]
                array = array * 255
            array = np.clip(np.round(array), 0, 255).astype(np.uint8)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ConfigError(f"an image array must be (height, width), (height, width, 1|3|4) or a batch of those; "
                              f"got shape {image.shape}")
        image = Image.fromarray(array)
    else:
        image = ImageOps.exif_transpose(image)  # phone photos: stored sideways, shown upright
    described = f"{image.width}x{image.height} {image.mode}"

    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit and float grayscale
        values = np.asarray(image, np.float64)
        top = values.max() if values.size and values.max() > 0 else 1.0
        image = Image.fromarray(np.round(values / top * 255).astype(np.uint8))
        done.append("scaled to 8 bits")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
            done.append("flattened transparency onto white")
    want = "L" if channels == 1 else "RGB"
    if image.mode != want:
        image = image.convert(want)
        done.append("converted to grayscale" if want == "L" else "converted to RGB")

    array = np.asarray(image)
    gray = array if array.ndim == 2 else array.mean(axis=-1)
    edge = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]]).astype(np.float64)
    background = float(np.median(edge)) if edge.size else 0.0
    flip = invert == "yes"
    if invert == "auto" and border_brightness is not None:
        flip = (border_brightness < 64 and background > 160) or (border_brightness > 191 and background < 96)
    if flip:
        image = ImageOps.invert(image)
        background = 255 - background
        done.append("inverted (light background; the training images have dark ones)" if invert == "auto"
                    and border_brightness is not None and border_brightness < 64 else "inverted")

    if image.width * height != image.height * width:  # pad, not stretch, to the model's aspect ratio
        new_w = max(image.width, -(-image.height * width // height))
        new_h = max(image.height, -(-image.width * height // width))
        fill = int(round(background)) if want == "L" else tuple(
            int(v) for v in np.median(np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]]), axis=0))
        if flip and want == "RGB":
            fill = tuple(255 - v for v in fill)
        canvas = Image.new(want, (new_w, new_h), fill)
        canvas.paste(image, ((new_w - image.width) // 2, (new_h - image.height) // 2))
        image = canvas
        done.append(f"padded to {new_w}x{new_h} with its background")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR, reducing_gap=3.0)
        done.append(f"resized to {width}x{height}")
    out = np.asarray(image, np.uint8)
    if out.ndim == 2:
        out = out[..., None]
    notes = [f"{described}: {', '.join(done)}"] if done else []
    return out, notes


def top_classes(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """The k most probable (class name, probability) pairs of each row, most probable first."""
    k = max(1, min(int(k), probs.shape[-1]))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(str(class_names[j]), float(row[j])) for j in idx] for row, idx in zip(probs, order)]


def predict(source: train_lib.TrainResult | str | os.PathLike, images, top_k: int = 3, invert: str = "auto",
            ) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) pairs for each image, most probable first.

    `source` is a workdir or the TrainResult of `cnn.train_and_evaluate`.
    `images` is a batch array (N, H, W[, C]), one image array, a PIL image,
    a file path, or a list of these; uint8 pixels, or floats in [0, 1].
    Images of another size or colour mode are converted, with a note on
    stderr (see `convert`).
    """
    from PIL import Image

    run = _as_run(source)
    shape = input_shape(run)
    if invert not in INVERT:
        raise ConfigError(f"invert={invert!r} must be one of {', '.join(INVERT)}")
    if isinstance(images, np.ndarray) and images.ndim == 4 or (
            isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] not in (1, 3, 4)):
        items = list(images)  # a batch (with channels, or grayscale without)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    arrays, notes = [], {}
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            item = open_image(os.fspath(item))
        elif not isinstance(item, (np.ndarray, Image.Image)):
            item = np.asarray(item)
        if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.shape == shape:
            arrays.append(item)
            continue
        array, item_notes = convert(item, shape, run.results.get("border_brightness"), invert)
        arrays.append(array)
        for note in item_notes:
            notes[note] = notes.get(note, 0) + 1
    for note, count in notes.items():
        print(f"note: {count} image{'s' if count > 1 else ''} {note}", file=sys.stderr)
    if not arrays:
        return []
    return top_classes(probabilities(run, np.stack(arrays)), run.class_names, top_k)


class ImageFileError(ConfigError):
    """A file given for prediction is missing or not an image."""


def open_image(path: str):
    """Opens an image file fully (so a truncated file fails here), or raises ImageFileError saying why."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise ImageFileError(f"{path}: no such file; pass the path of a PNG or JPEG image")
    if os.path.isdir(path):
        raise ImageFileError(f"{path}: is a folder; pass image files (e.g. {path}/*.png)")
    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError:
        raise ImageFileError(f"{path}: not an image file (PIL cannot read it); pass a PNG or JPEG image") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt; unreadable
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise ImageFileError(f"{path}: the image could not be read ({detail}); pass an intact PNG or JPEG "
                             "image") from None
    return image


# --- Command line -------------------------------------------------------------


def _format(path: str, pairs: list[tuple[str, float]]) -> str:
    return f"{path}: " + ", ".join(f"{name} ({p:.1%})" for name, p in pairs)


def main(argv: list[str]) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    paths = argv[1:]
    if not paths:
        _fail("no images given; usage: python -m cnn.predict --workdir=DIR IMAGE [IMAGE ...]")
    if FLAGS.top_k < 1:
        _fail(f"--top_k={FLAGS.top_k} must be at least 1")
    try:
        run = load(FLAGS.workdir)
        shape = input_shape(run)
    except ConfigError as e:
        _fail(str(e))
    failed, ready = 0, []
    for path in paths:  # a bad file is reported and the rest still predicted
        try:
            array, notes = convert(open_image(path), shape, run.results.get("border_brightness"), FLAGS.invert)
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
            print(_format(path, pairs), flush=True)
    if failed:
        print(f"error: {failed} of {len(paths)} files could not be predicted (see above)", file=sys.stderr)
        sys.exit(2)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a mistake reported as one line and exit status 2."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e}\nusage: python -m cnn.predict --workdir=DIR [--top_k=3] [--invert=auto|yes|no] IMAGE [IMAGE ...]")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "The workdir of a training run (it holds config.json and checkpoints/).")
    flags.DEFINE_integer("top_k", 3, "How many of the most probable classes to print for each image.")
    flags.DEFINE_enum("invert", "auto", list(INVERT),
                      "Invert the image's brightness: 'auto' when its background is the opposite of the training "
                      "images' (a black-on-white drawing for MNIST), or always, or never.")
    flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
    from absl import app, logging

    _define_flags()
    logging.set_verbosity(logging.WARNING)
    app.run(main, flags_parser=_parse_flags)

"""Predictions from a trained workdir: on arrays in a notebook, on image files from cnn/predict.py.

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
import math
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

    `border_brightness`: the mean pixel (0-255) on the edges of the training
    images; near 0 for MNIST's white-on-black digits, which tells prediction
    to invert a black-on-white drawing. `ink_extent`: on such plain
    backgrounds, the typical size of the object as a fraction of the image
    (MNIST digits fill ~20 of 28 pixels), so a drawing is framed alike.
    """
    images = dataset.train.images
    info = {"class_names": [str(n) for n in dataset.class_names], "input_shape": [int(v) for v in dataset.input_shape]}
    if images.ndim != 4 or images.dtype != np.uint8:
        return info  # token ids or series: nothing to invert or frame
    edges = [images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]]
    border = float(np.mean([e.mean(dtype=np.float64) for e in edges]))
    info["border_brightness"] = round(border, 2)
    if border < 64 or border > 191:
        sample = images[np.random.default_rng(0).permutation(len(images))[:2000]].mean(axis=-1)
        extents = [e for e in (_ink_box(image, border)[1] for image in sample) if e is not None]
        if extents:
            info["ink_extent"] = round(float(np.median(extents)), 3)
    return info


def _ink_box(gray: np.ndarray, background: float) -> tuple[tuple[int, int, int, int] | None, float | None]:
    """The (top, left, bottom, right) box of the pixels that differ from `background`, and its size as a fraction."""
    ink = np.abs(gray.astype(np.float64) - background) > 64
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if not rows.size:
        return None, None
    box = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    return box, max((box[2] - box[0]) / gray.shape[0], (box[3] - box[1]) / gray.shape[1])


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (its config.json)."""
    if not os.path.isdir(workdir):
        raise ConfigError(f"workdir={workdir!r} does not exist; pass the --workdir of a training run "
                          "(python -m cnn.main --config=CONFIG --workdir=DIR)")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"workdir={workdir!r} has no config.json, so no training run wrote it; pass the --workdir "
                          "given to python -m cnn.main")
    content = _read_json(path)
    missing = [k for k in ("data", "model", "optimizer", "train") if not isinstance(content, dict) or k not in content]
    if missing:
        raise ConfigError(f"{path} is not a config written by training (it lacks {', '.join(missing)}); pass the "
                          "--workdir given to python -m cnn.main, or train again there")
    return ml_collections.ConfigDict(content)


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
    directory = os.path.join(workdir, "checkpoints")
    no_checkpoint = ConfigError(f"workdir={workdir!r} has no checkpoint yet; train first (python -m cnn.main "
                                f"--config=CONFIG --workdir={workdir}) or pass the workdir of a run that saved one")
    if not os.path.isdir(directory) or not any(name.isdigit() for name in os.listdir(directory)):
        raise no_checkpoint  # before any work
    results = _read_json(os.path.join(workdir, "results.json")) or {}
    if not {"class_names", "input_shape"} <= results.keys():
        results = {**results, **dataset_info(data_lib.load(config.data))}
    class_names = list(results["class_names"])
    input_shape = tuple(results["input_shape"])
    model = models.build_model(config.model, len(class_names))
    loss = models.check_head(model, input_shape, len(class_names), config.loss)
    # The optimizer gives the checkpoint's structure; its schedule's length does not matter here.
    tx = train_lib.make_optimizer(config.optimizer, 1, config.train.num_epochs)
    fresh = train_lib.create_state(model, tx, input_shape, config.seed, loss, config.data)
    checkpoints = checkpoint.Checkpoints(workdir)
    try:
        restored = checkpoints.restore(fresh)
    finally:
        checkpoints.close()
    if restored is None:  # every one was damaged, and set aside
        raise no_checkpoint
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


def convert(image, shape: Sequence[int], info: dict[str, Any] | None = None, invert: str = "auto",
            frame: bool = True) -> tuple[np.ndarray, list[str]]:
    """Returns `image` (a PIL image or an array) as uint8 (height, width, channels) of `shape`, and what was done.

    Transparency is flattened onto white, as a viewer shows it; colour and
    grayscale are converted to the model's channels; a light background is
    inverted when the training images had dark ones (`invert='auto'`, from
    `info`, the run's results), or always ('yes') or never ('no'). When the
    training images are objects on a plain background, the image is cropped
    to its object and framed as they are (`frame`); otherwise it is padded
    to the model's aspect ratio with its background. Then it is resized.
    """
    from PIL import Image, ImageOps

    if len(shape) != 3:
        raise ConfigError(f"the model takes inputs shaped {tuple(shape)}, not images (height, width, channels); "
                          "pass arrays of exactly that shape to cnn.predict")
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
    info = info or {}
    trained_on = info.get("border_brightness")
    flip = invert == "yes"
    if invert == "auto" and trained_on is not None:
        flip = (trained_on < 64 and background > 160) or (trained_on > 191 and background < 96)
    if flip:
        image = ImageOps.invert(image)
        background = 255 - background
        if invert == "yes":
            done.append("inverted (as asked)")
        elif trained_on < 64:
            done.append("inverted (light background; the training images have dark ones)")
        else:
            done.append("inverted (dark background; the training images have light ones)")

    extent = info.get("ink_extent")
    box = None
    if frame and extent and image.size != (width, height) and min(background, 255 - background) < 64:
        # Another size, on a plain background as in training: find the object.
        gray = np.asarray(image.convert("L"))
        box, _ = _ink_box(gray, background)
    if box is not None:  # crop to the object, then frame it as the training images frame theirs
        top, left, bottom, right = box
        h, w = bottom - top, right - left
        # Centred on its centre of mass, as MNIST's digits are; the canvas grows if that needs more room.
        weight = np.abs(gray[top:bottom, left:right].astype(np.float64) - background)
        cy = float((weight.sum(axis=1) * np.arange(h)).sum() / weight.sum()) + 0.5
        cx = float((weight.sum(axis=0) * np.arange(w)).sum() / weight.sum()) + 0.5
        side = max(math.ceil(max(h, w) / extent), 2 * math.ceil(max(cy, h - cy, cx, w - cx)), 1)
        canvas = Image.new(want, (side, side), _fill(want, background, image))
        canvas.paste(image.crop((left, top, right, bottom)), (round(side / 2 - cx), round(side / 2 - cy)))
        image = canvas
        done.append(f"cropped to the drawing and centred on its centre of mass to span {extent:.0%} of the image, as in training")
    elif image.width * height != image.height * width:  # pad, not stretch, to the model's aspect ratio
        new_w = max(image.width, -(-image.height * width // height))
        new_h = max(image.height, -(-image.width * height // width))
        canvas = Image.new(want, (new_w, new_h), _fill(want, background, image))
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


def _fill(mode: str, background: float, image) -> int | tuple[int, ...]:
    """The background colour to pad `image` with: its median edge colour."""
    if mode == "L":
        return int(round(background))
    array = np.asarray(image)
    edge = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    return tuple(int(v) for v in np.median(edge, axis=0))


def top_classes(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """The k most probable (class name, probability) pairs of each row, most probable first."""
    k = max(1, min(int(k), probs.shape[-1]))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(str(class_names[j]), float(row[j])) for j in idx] for row, idx in zip(probs, order)]


def predict(source: train_lib.TrainResult | str | os.PathLike, images, top_k: int = 3, invert: str = "auto",
            frame: bool = True) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) pairs for each image, most probable first.

    `source` is a workdir or the TrainResult of `cnn.train_and_evaluate`.
    `images` is a batch array (N, H, W[, C]), one image array, a PIL image,
    a file path, or a list of these; uint8 pixels, or floats in [0, 1].
    Images of another size or colour mode are converted, with a note on
    stderr (see `convert` for `invert` and `frame`).
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
        array, item_notes = convert(item, shape, run.results, invert, frame)
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

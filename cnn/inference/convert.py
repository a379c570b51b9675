"""Turning any image into what a model was trained on, saying in a note each thing that was done.

Transparency is flattened onto white, as a viewer shows it; colour and
grayscale are converted to the model's channels; a light background is
inverted when the training images had dark ones (as a drawing usually has);
an object on a plain background is framed as the training objects are; then
the image is resized. The notes let a surprising answer be traced.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnn.data.images import ink_box, to_mode
from cnn.errors import ConfigError

INVERT = ("auto", "yes", "no")


class ImageFileError(ConfigError):
    """A file given for prediction is missing or not an image."""


def open_image(path: str) -> Image.Image:
    """Opens an image file fully (so a truncated file fails here), or raises ImageFileError saying why."""
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


def convert(image, shape: Sequence[int], info: dict[str, Any] | None = None, invert: str = "auto",
            frame: bool = True) -> tuple[np.ndarray, list[str]]:
    """Returns `image` (a PIL image or an array) as uint8 (height, width, channels) of `shape`, and what was done.

    `info` is the run's results (border brightness and ink extent of the
    training images); `invert` is 'auto' (from `info`), 'yes' or 'no';
    `frame` crops an object on a plain background and frames it as the
    training images frame theirs (otherwise the image is padded to the
    model's aspect ratio with its background).
    """
    height, width, channels = _check_shape(shape)
    done: list[str] = []
    image = _as_pil(image)
    described = f"{image.width}x{image.height} {image.mode}"
    image = to_mode(image, "L" if channels == 1 else "RGB", done)
    background = _background(image)
    image, background = _maybe_invert(image, background, info or {}, invert, done)
    image = _fit(image, (width, height), background, (info or {}).get("ink_extent") if frame else None, done)
    out = np.asarray(image, np.uint8)
    if out.ndim == 2:
        out = out[..., None]
    return out, ([f"{described}: {', '.join(done)}"] if done else [])


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ConfigError(f"the model takes inputs shaped {tuple(shape)}, not images (height, width, channels); "
                          "pass arrays of exactly that shape to cnn.predict")
    height, width, channels = (int(v) for v in shape)
    if channels not in (1, 3):
        raise ConfigError(f"the model takes {channels}-channel images; only 1 (grayscale) or 3 (RGB) can be made "
                          "from an image file; pass arrays of that shape to cnn.predict instead")
    return height, width, channels


def _as_pil(image) -> Image.Image:
    """A PIL image from an array (uint8, or floats in [0, 1]) or a PIL image (turned upright, as photos are shown)."""
    if not isinstance(image, np.ndarray):
        return ImageOps.exif_transpose(image)
    array = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    if array.dtype != np.uint8:
        array = np.asarray(array, np.float64)
        if array.size and array.max() <= 1.0:  # floats in [0, 1]
            array = array * 255
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ConfigError(f"an image array must be (height, width), (height, width, 1|3|4) or a batch of those; "
                          f"got shape {image.shape}")
    return Image.fromarray(array)


def _background(image: Image.Image) -> float:
    """The median brightness of the image's edge pixels."""
    array = np.asarray(image)
    gray = array if array.ndim == 2 else array.mean(axis=-1)
    edge = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]]).astype(np.float64)
    return float(np.median(edge)) if edge.size else 0.0


def _maybe_invert(image: Image.Image, background: float, info: dict, invert: str, done: list[str]
                  ) -> tuple[Image.Image, float]:
    trained_on = info.get("border_brightness")
    flip = invert == "yes"
    if invert == "auto" and trained_on is not None:
        flip = (trained_on < 64 and background > 160) or (trained_on > 191 and background < 96)
    if not flip:
        return image, background
    if invert == "yes":
        done.append("inverted (as asked)")
    elif trained_on < 64:
        done.append("inverted (light background; the training images have dark ones)")
    else:
        done.append("inverted (dark background; the training images have light ones)")
    return ImageOps.invert(image), 255 - background


def _fit(image: Image.Image, size: tuple[int, int], background: float, extent: float | None, done: list[str]
         ) -> Image.Image:
    """Framed like the training objects (`extent` of the image) if it shows one on a plain background, else
    padded to the model's aspect ratio; then resized to `size` (width, height)."""
    width, height = size
    box = None
    if extent and image.size != size and min(background, 255 - background) < 64:
        gray = np.asarray(image.convert("L"))
        box, _ = ink_box(gray, background)
    if box is not None:
        image = _frame(image, gray, box, background, extent)
        done.append(f"cropped to the drawing and centred on its centre of mass to span {extent:.0%} of the image, "
                    "as in training")
    elif image.width * height != image.height * width:  # pad, not stretch
        new_w = max(image.width, -(-image.height * width // height))
        new_h = max(image.height, -(-image.width * height // width))
        canvas = Image.new(image.mode, (new_w, new_h), _fill(image, background))
        canvas.paste(image, ((new_w - image.width) // 2, (new_h - image.height) // 2))
        image = canvas
        done.append(f"padded to {new_w}x{new_h} with its background")
    if image.size != size:
        image = image.resize(size, Image.BILINEAR, reducing_gap=3.0)
        done.append(f"resized to {width}x{height}")
    return image


def _frame(image: Image.Image, gray: np.ndarray, box: tuple[int, int, int, int], background: float,
           extent: float) -> Image.Image:
    """The object in `box`, centred on its centre of mass (as MNIST's digits are) on a square canvas where it
    spans `extent`; the canvas grows if the centring needs more room."""
    top, left, bottom, right = box
    h, w = bottom - top, right - left
    weight = np.abs(gray[top:bottom, left:right].astype(np.float64) - background)
    cy = float((weight.sum(axis=1) * np.arange(h)).sum() / weight.sum()) + 0.5
    cx = float((weight.sum(axis=0) * np.arange(w)).sum() / weight.sum()) + 0.5
    side = max(math.ceil(max(h, w) / extent), 2 * math.ceil(max(cy, h - cy, cx, w - cx)), 1)
    canvas = Image.new(image.mode, (side, side), _fill(image, background))
    canvas.paste(image.crop((left, top, right, bottom)), (round(side / 2 - cx), round(side / 2 - cy)))
    return canvas


def _fill(image: Image.Image, background: float) -> int | tuple[int, ...]:
    """The colour to pad `image` with: its median edge colour."""
    if image.mode == "L":
        return int(round(background))
    array = np.asarray(image)
    edge = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    return tuple(int(v) for v in np.median(edge, axis=0))

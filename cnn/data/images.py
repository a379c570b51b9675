"""Image arrays: scaling and augmentation inside the compiled step, and conversions done once at load time.

Images stay uint8 until `preprocess`, which runs on the device; token ids
(int32) and series (float32) pass through it unchanged, so the compiled steps
are the same for every kind of input.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn.errors import ConfigError


# data.preprocessing (cnn.config.PREPROCESSING): the modes of Keras's imagenet_utils.preprocess_input, for weights
# trained with one of them. 'caffe': RGB to BGR, then the ImageNet mean pixel subtracted on the 0-255 scale; 'tf':
# to [-1, 1]; 'torch': to [0, 1], then ImageNet's per-channel mean and std.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def preprocess(images: jax.Array, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
               mode: str | None = None) -> jax.Array:
    """uint8 images to float32 in [0, 1], then (x - mean) / std if given (data.mean, data.std); or, with `mode`
    (data.preprocessing), as Keras's preprocess_input does for that mode.

    Other inputs (int32 token ids, float32 series) are returned unchanged.
    """
    if images.dtype != jnp.uint8:
        return images
    x = images.astype(jnp.float32)
    if mode == "caffe":
        return x[..., ::-1] - jnp.asarray(_CAFFE_MEAN_BGR, jnp.float32)
    if mode == "tf":
        return x / 127.5 - 1.0
    x = x / 255.0
    if mode == "torch":
        mean, std = _TORCH_MEAN, _TORCH_STD
    if mean is not None:
        x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x


def augment(images: jax.Array, rng: jax.Array, crop_padding: int = 0, flip: bool = False,
            pad_mode: str = "constant") -> jax.Array:
    """Random crops and horizontal flips of a uint8 NHWC batch, a different draw per example.

    Each image is padded by `crop_padding` pixels on every side (zeros for
    pad_mode='constant', mirrored for 'reflect') and cropped back to its size
    at a random offset; with `flip`, half of the images, at random, are
    mirrored left to right. Pure and shape-preserving, so it runs inside the
    compiled train step, and a given `rng` always gives the same batch, which
    keeps resumed runs exact.
    """
    if images.ndim != 4:
        return images  # token ids and series are not images
    n, height, width, channels = images.shape
    crop_rng, flip_rng = jax.random.split(rng)
    if crop_padding:
        p = crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode=pad_mode)
        offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * p + 1)
        images = jax.vmap(lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (height, width, channels))
                          )(padded, offsets)
    if flip:
        mirror = jax.random.bernoulli(flip_rng, 0.5, (n,))
        images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1, :], images)
    return images


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The training augmentation a config asks for (data.crop_padding, data.flip, data.pad_mode)."""

    crop_padding: int = 0
    flip: bool = False
    pad_mode: str = "constant"

    @classmethod
    def from_config(cls, data: ml_collections.ConfigDict) -> "Augmentation":
        return cls(int(data.crop_padding), bool(data.flip), str(data.pad_mode))

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.flip)

    def __call__(self, images: jax.Array, rng: jax.Array) -> jax.Array:
        return augment(images, rng, self.crop_padding, self.flip, self.pad_mode) if self.active else images


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 images to `channels` channels: RGB to grey by luma (ITU-R 601), grey to RGB by repeating."""
    have = images.shape[-1]
    if have == channels:
        return images
    if have == 3 and channels == 1:
        grey = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None]
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    raise ConfigError(f"data.channels={channels!r}: cannot convert images with {have} channels; use 1 (grey), "
                      f"3 (RGB) or None (keep {have})")


def resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes uint8 images (N, H, W, C) to `size` bilinearly; a no-op at the same size."""
    from PIL import Image  # Pillow only where a resize is asked for

    if images.shape[1:3] == tuple(size):
        return images
    height, width = size
    out = np.empty((len(images), height, width, images.shape[-1]), np.uint8)
    for i, image in enumerate(images):
        channels = [Image.fromarray(image[..., c]).resize((width, height), Image.BILINEAR)
                    for c in range(image.shape[-1])]
        out[i] = np.stack([np.asarray(c) for c in channels], axis=-1)
    return out


# PIL modes that hold one channel of brightness (with or without alpha, at 1, 8, 16 or 32 bits).
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def to_mode(image, want: str, done: list[str] | None = None):
    """A PIL image as 8-bit grey ('L') or 'RGB', saying in `done` what was changed.

    Palette images become colour, 16-bit and float grey is scaled to 8 bits by
    the image's own maximum, transparency is flattened onto white (as a viewer
    shows it). Training from files and prediction both convert through here,
    so a file reads the same in both.
    """
    from PIL import Image  # Pillow only where files are read

    done = [] if done is None else done
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit and float grayscale
        values = np.asarray(image, np.float64)
        top = values.max() if values.size and values.max() > 0 else 1.0
        image = Image.fromarray(np.round(values / top * 255).astype(np.uint8))
        done.append("scaled to 8 bits")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") and np.asarray(image.getchannel("A")).min() < 255:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
        done.append("flattened transparency onto white")
    if image.mode != want:
        image = image.convert(want)
        done.append("converted to grayscale" if want == "L" else "converted to RGB")
    return image


def ink_box(gray: np.ndarray, background: float) -> tuple[tuple[int, int, int, int] | None, float | None]:
    """The (top, left, bottom, right) box of the pixels that differ from `background`, and its size as a fraction."""
    ink = np.abs(gray.astype(np.float64) - background) > 64
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if not rows.size:
        return None, None
    box = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    return box, max((box[2] - box[0]) / gray.shape[0], (box[3] - box[1]) / gray.shape[1])

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


def mix(inputs: jax.Array, labels: jax.Array, rng: jax.Array, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0
        ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Mixup or CutMix of a float batch: (mixed inputs, (partner labels, ratio per example)).

    Example i's partner is example n-1-i (the batch reversed, as timm does),
    and its ratio r_i, its own label's share of the target, is drawn from
    Beta(alpha, alpha). Mixup blends the inputs: r_i * x_i + (1 - r_i) *
    x_partner. CutMix pastes a box of the partner covering about 1 - r_i of
    the image, at a random centre and clipped at the borders; r_i becomes the
    share left uncovered. With both alphas > 0 one of the two is chosen per
    call (per step), each with probability 0.5.
    """
    n = inputs.shape[0]
    partners, partner_labels = inputs[::-1], labels[::-1]
    choose_rng, mixup_rng, cutmix_rng = jax.random.split(rng, 3)
    mixed = []
    if mixup_alpha:
        ratio = jax.random.beta(mixup_rng, mixup_alpha, mixup_alpha, (n,))
        r = ratio.reshape((n,) + (1,) * (inputs.ndim - 1)).astype(inputs.dtype)
        mixed.append((r * inputs + (1 - r) * partners, ratio))
    if cutmix_alpha:
        mixed.append(_cutmix(inputs, partners, cutmix_rng, cutmix_alpha))
    (x, ratio), *other = mixed
    if other:
        use_cutmix = jax.random.bernoulli(choose_rng)
        x, ratio = jax.tree_util.tree_map(lambda a, b: jnp.where(use_cutmix, b, a), (x, ratio), other[0])
    return x, (partner_labels, ratio)


def _cutmix(images: jax.Array, partners: jax.Array, rng: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
    """CutMix of an NHWC batch with its partners, a box per example (timm's rand_bbox, per example)."""
    n, height, width = images.shape[:3]
    ratio_rng, y_rng, x_rng = jax.random.split(rng, 3)
    cut = jnp.sqrt(1.0 - jax.random.beta(ratio_rng, alpha, alpha, (n,)))
    half_h, half_w = (cut * height).astype(jnp.int32) // 2, (cut * width).astype(jnp.int32) // 2
    cy, cx = jax.random.randint(y_rng, (n,), 0, height), jax.random.randint(x_rng, (n,), 0, width)
    top, bottom = jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height)
    left, right = jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width)
    rows, cols = jnp.arange(height), jnp.arange(width)
    in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])
    in_cols = (cols >= left[:, None]) & (cols < right[:, None])
    box = in_rows[:, :, None, None] & in_cols[:, None, :, None]
    covered = ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
    return jnp.where(box, partners, images), 1.0 - covered


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The training augmentation a config asks for: crop and flip of the uint8 images (data.crop_padding,
    data.flip, data.pad_mode), then mixup or cutmix of the scaled inputs (data.mixup_alpha, data.cutmix_alpha)."""

    crop_padding: int = 0
    flip: bool = False
    pad_mode: str = "constant"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    @classmethod
    def from_config(cls, data: ml_collections.ConfigDict) -> "Augmentation":
        return cls(int(data.crop_padding), bool(data.flip), str(data.pad_mode),
                   float(data.get("mixup_alpha", 0.0)), float(data.get("cutmix_alpha", 0.0)))  # .get: older runs

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.flip)

    @property
    def mixes(self) -> bool:
        return bool(self.mixup_alpha or self.cutmix_alpha)

    def __call__(self, images: jax.Array, rng: jax.Array) -> jax.Array:
        return augment(images, rng, self.crop_padding, self.flip, self.pad_mode) if self.active else images

    def mix(self, inputs: jax.Array, labels: jax.Array, rng: jax.Array
            ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """`mix` of the scaled inputs if mixup or cutmix is on; else the inputs unchanged and no mix."""
        if not self.mixes:
            return inputs, None
        return mix(inputs, labels, rng, self.mixup_alpha, self.cutmix_alpha)

    def check(self, dtype: np.dtype, ndim: int) -> None:
        """Refuses mixing that the inputs cannot take: mixup of token ids, cutmix of anything but images."""
        if self.mixup_alpha and np.issubdtype(dtype, np.integer) and dtype != np.uint8:
            raise ConfigError(f"data.mixup_alpha={self.mixup_alpha}: token ids cannot be blended; set it to 0.0 "
                              "for text data")
        if self.cutmix_alpha and not (dtype == np.uint8 and ndim == 4):
            raise ConfigError(f"data.cutmix_alpha={self.cutmix_alpha}: CutMix pastes boxes of images, and these "
                              "inputs are not images; set it to 0.0 (data.mixup_alpha works for series)")


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

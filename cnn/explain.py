"""Where a trained model looked: Grad-CAM over its last convolution, and gradient saliency.

    ex = cnn.plots.grad_cam(run, test.images[:4])        # or class_index=3 to ask about class 3
    ex.heat_maps, ex.saliency, ex.classes, ex.probabilities, ex.layer, ex.taken_at

Grad-CAM (Selvaraju et al., 2017): the gradients of one class's logit with
respect to the last convolution's feature map, averaged over positions,
weight that map's channels; the ReLU of the weighted sum, upsampled to the
input's size, is the heat map. Saliency (Simonyan et al., 2013) is the
absolute gradient of the same logit with respect to the input, the largest
over its channels. Both come from one forward and one backward pass.

The last convolution is found in any model, a spec's Sequential, a preset,
a backbone or your own Flax module, with a Flax method interceptor on every
module call: a first trace records the calls in order with their shapes;
the map is the last convolution's output as the next modules receive it
(after its batch norm, activation and residual sum: the rectified map the
Grad-CAM paper weighs; see `target`). The second trace adds a zero array to
that map and differentiates with respect to it. The interceptor sits
outside the kernels' (cnn/kernels), so it sees the map whichever path
computed it. Inputs are scaled as evaluation scales them (the run's
recipe), in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn import losses
from cnn.errors import ConfigError
from cnn.train import Recipe, TrainResult, TrainState


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What `grad_cam` found for N inputs. Maps are shaped like the inputs without channels: (N, height, width)
    for images, (N, length) for series and token ids; each is scaled to [0, 1] by its own maximum."""

    heat_maps: np.ndarray  # Grad-CAM, float32
    saliency: np.ndarray | None  # |d logit / d input|, max over channels, float32; None for token ids
    classes: np.ndarray  # (N,) int: the class each map explains (the predicted one unless class_index chose)
    probabilities: np.ndarray  # (N, classes): the model's class probabilities for the inputs
    layer: str  # the path of the convolution whose map Grad-CAM weighed ('conv2d_1', 'residual_block_8/Conv_1')
    taken_at: str | None = None  # where the map was taken: 'the input of max_pooling2d'; None: the conv's output

    def part(self, index: slice | int) -> "Explanation":
        """The explanation of some inputs: `ex.part(slice(0, 2))`, or `ex.part(3)` for one (kept as a batch of 1)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return dataclasses.replace(self, heat_maps=self.heat_maps[index], classes=self.classes[index],
                                   saliency=None if self.saliency is None else self.saliency[index],
                                   probabilities=self.probabilities[index])


@dataclasses.dataclass(frozen=True)
class _Event:
    """An array a module call received ('input') or returned ('output'), as the tap saw it, in time order."""

    kind: str
    call: int  # the call's number, in the order the calls began
    path: str  # the module's path
    conv: bool
    shape: tuple[int, ...]


@dataclasses.dataclass
class _Tap:
    """A Flax method interceptor on every module call: records the arrays the calls receive and return (`events`),
    and adds `delta` to one of them, `at` = ('input' | 'output', call number), keeping the sum as `activation`."""

    at: tuple[str, int] = ("", -1)
    delta: jax.Array | None = None
    events: list[_Event] = dataclasses.field(default_factory=list)
    calls: int = 0
    activation: jax.Array | None = None

    def __call__(self, next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        n, self.calls = self.calls, self.calls + 1
        if args and hasattr(args[0], "shape"):
            args = (self._see("input", n, context.module, args[0]), *args[1:])
        y = next_fun(*args, **kwargs)
        return self._see("output", n, context.module, y) if hasattr(y, "shape") else y

    def _see(self, kind: str, n: int, module: nn.Module, x: jax.Array) -> jax.Array:
        self.events.append(_Event(kind, n, "/".join(module.path), isinstance(module, nn.Conv), tuple(x.shape)))
        if self.at == (kind, n):
            x = self.activation = x + self.delta.astype(x.dtype)
        return x


def _logits(state: TrainState, x: jax.Array, tap: _Tap) -> jax.Array:
    with nn.intercept_methods(tap):  # outside the kernels' interceptor, so it sees what they computed
        return state.apply_fn(state.variables(), x, train=False, logits=True).astype(jnp.float32)


def _events(run: TrainResult, batch_shape: tuple[int, ...]) -> list[_Event]:
    """What every module call of the model receives and returns on a batch of `batch_shape`, traced without
    computing anything."""
    tap, recipe = _Tap(), _float32(run.recipe)
    jax.eval_shape(lambda state, x: _logits(state, recipe.inputs(x), tap), run.state,
                   jax.ShapeDtypeStruct(batch_shape, _input_dtype(batch_shape)))
    return tap.events


@dataclasses.dataclass(frozen=True)
class Target:
    """The feature map Grad-CAM weighs: the last convolution's (`layer`), as the network passes it on."""

    at: tuple[str, int]  # for `_Tap`
    shape: tuple[int, ...]
    layer: str  # the convolution's module path
    taken_at: str | None  # 'the input of max_pooling2d', 'the output of residual_block_8'; None: the conv's own


def target(events: list[_Event]) -> Target:
    """The last convolution whose output has more than one position (a 1x1 convolution on pooled features, as in
    a squeeze-excite block, maps nothing), and its map as late as the module calls show it with the same positions:
    the last of the arrays right after its output that have them (batch norm's input and output, a pooling's
    input, the output of the residual block around it). So the map is taken after the normalisation, activation
    and residual sum between, as the Grad-CAM paper's rectified maps are, where a module call shows it."""
    convs = [i for i, e in enumerate(events) if e.kind == "output" and e.conv and math.prod(e.shape[1:-1]) > 1]
    if not convs:
        raise ConfigError("this model has no convolution layer with a spatial output, so Grad-CAM has nothing to "
                          "look at; explain a model with Conv2D or Conv1D layers")
    conv = events[convs[-1]]
    last = convs[-1]
    while last + 1 < len(events) and events[last + 1].shape[:-1] == conv.shape[:-1]:
        last += 1
    found = events[last]
    return Target((found.kind, found.call), found.shape, conv.path,
                  None if last == convs[-1] else f"the {found.kind} of {found.path}")


def _float32(recipe: Recipe) -> Recipe:
    """Explanations compute in float32 whatever the run trained in: bf16 gradients are too coarse for a map."""
    return dataclasses.replace(recipe, compute_dtype="float32")


def _input_dtype(shape: Sequence[int]) -> np.dtype:
    """As cnn/data gives inputs: uint8 images (N, H, W, C), int32 token ids (N, length), float32 series."""
    return np.dtype({4: np.uint8, 2: np.int32}.get(len(shape), np.float32))


@functools.partial(jax.jit, static_argnames=("recipe", "at"))
def _maps(state: TrainState, images: jax.Array, chosen: jax.Array, recipe: Recipe, at: Target
          ) -> dict[str, jax.Array]:
    """Grad-CAM and saliency of a batch: one forward pass, then one backward pass from the chosen class's logit
    (`chosen` -1: the predicted class) to the last convolution's output and to the scaled input."""
    x = recipe.inputs(images)

    def forward(delta, x):
        tap = _Tap(at.at, delta)
        return _logits(state, x, tap), tap.activation

    logits, backward, activation = jax.vjp(forward, jnp.zeros(at.shape, jnp.float32), x, has_aux=True)
    probs = losses.probabilities(recipe.loss, logits)
    classes = jnp.where(chosen < 0, probs.argmax(-1), chosen)
    if logits.shape[-1] == 1:  # a sigmoid head: class 1's logit is z, class 0's is -z
        seed = (2.0 * classes - 1.0)[:, None].astype(jnp.float32)
    else:
        seed = jax.nn.one_hot(classes, logits.shape[-1], dtype=jnp.float32)
    conv_grads, input_grads = backward(seed)
    positions = tuple(range(1, activation.ndim - 1))
    weights = conv_grads.mean(axis=positions, keepdims=True)  # one weight per channel
    cam = jax.nn.relu((weights * activation.astype(jnp.float32)).sum(-1))
    cam = jax.image.resize(cam, (*cam.shape[:1], *images.shape[1:cam.ndim]), "linear")
    out = {"heat_maps": _unit(cam), "classes": classes, "probabilities": probs}
    if images.dtype != jnp.int32:  # token ids are cast to integers inside the model: no gradient reaches them
        out["saliency"] = _unit(jnp.abs(input_grads).max(-1))
    return out


def _unit(maps: jax.Array) -> jax.Array:
    """Each map divided by its maximum (an all-zero map stays zero)."""
    top = maps.reshape(len(maps), -1).max(-1).reshape(-1, *(1,) * (maps.ndim - 1))
    return jnp.where(top > 0, maps / jnp.where(top > 0, top, 1.0), 0.0)


def grad_cam(run: TrainResult, images: Any, class_index: int | Sequence[int] | None = None,
             batch_size: int = 64) -> Explanation:
    """Grad-CAM heat maps over the last convolution, and gradient saliency maps, for raw inputs.

    `run` is `cnn.load_run(workdir)` or what `cnn.train_and_evaluate`
    returned; `images` one input or a batch as the dataset holds them
    (uint8 (H, W, C) images, float32 series, int32 token ids). Each map
    explains the logit of `class_index` (one class for all inputs, or one
    per input), by default the class the model predicts. Returns an
    `Explanation`; its maps are in [0, 1] and the size of the inputs.
    """
    shape = tuple(run.results["input_shape"])
    images = np.asarray(images)
    if images.shape == shape:
        images = images[None]
    if images.shape[1:] != shape:
        raise ConfigError(f"grad_cam takes inputs shaped {shape} (or a batch of them) as the run trained on, not "
                          f"{images.shape}; convert files with cnn.inference.convert")
    if images.ndim == 4 and not np.issubdtype(images.dtype, np.integer):
        raise ConfigError(f"grad_cam takes uint8 pixels as the dataset holds them, not {images.dtype}; convert "
                          "floats and files with cnn.inference.convert")
    if not len(images):
        raise ConfigError("grad_cam got no inputs; pass at least one")
    images = images.astype(_input_dtype(images.shape))
    chosen = _classes(class_index, len(images), len(run.class_names))
    size = max(1, min(batch_size, len(images)))
    at, recipe = target(_events(run, (size, *shape))), _float32(run.recipe)
    parts = []
    for start in range(0, len(images), size):  # one batch shape, one compilation
        batch, wanted = images[start:start + size], chosen[start:start + size]
        pad = size - len(batch)
        batch = np.concatenate([batch, np.zeros((pad, *shape), batch.dtype)])
        wanted = np.concatenate([wanted, np.full(pad, -1, np.int32)])
        maps = _maps(run.state, batch, wanted, recipe, at)
        parts.append({k: np.asarray(v)[:size - pad] for k, v in maps.items()})
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Explanation(heat_maps=joined["heat_maps"], saliency=joined.get("saliency"),
                       classes=joined["classes"].astype(np.int64), probabilities=joined["probabilities"],
                       layer=at.layer, taken_at=at.taken_at)


def _classes(class_index: int | Sequence[int] | None, count: int, classes: int) -> np.ndarray:
    """The class asked about for each of `count` inputs, -1 where the predicted one is wanted."""
    if class_index is None:
        return np.full(count, -1, np.int32)
    wanted = np.broadcast_to(np.asarray(class_index), (count,)) if np.ndim(class_index) == 0 else \
        np.asarray(class_index)
    if wanted.shape != (count,) or not np.issubdtype(wanted.dtype, np.integer) or \
            ((wanted < 0) | (wanted >= classes)).any():
        raise ConfigError(f"class_index={class_index!r} must be a class number from 0 to {classes - 1} (or one per "
                          f"input, {count} of them), or None for the predicted class")
    return wanted.astype(np.int32)

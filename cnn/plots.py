"""Pictures of a trained model: learning curves, filters, feature maps, confusion matrix, mistakes, per-class recall,
and for two classes the ROC and precision-recall curves.

Each function returns a `matplotlib.figure.Figure` made without pyplot, so
it works headless (no display, no global state) and shows inline in a
notebook. `write_plots` saves them all as PNGs in WORKDIR/plots/ and adds
them to the TensorBoard event files; `python -m cnn.main` calls it when
training ends, and `python -m cnn.visualize --workdir=DIR` redraws them from
the checkpoint.

    run = cnn.load_run("runs/mnist")                       # or cnn.train_and_evaluate(...)
    test = cnn.load_dataset(cnn.load_config("configs/mnist.py").data).test
    cnn.plots.confusion_matrix(run, test)
    cnn.plots.explain(run, test.images[:3])                # Grad-CAM and saliency; grad_cam(...) for the arrays
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
import sys
import textwrap
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from PIL import Image
from tensorboardX import SummaryWriter

from cnn import data as data_lib
from cnn import workdir as workdir_lib
from cnn.explain import Explanation, grad_cam
from cnn.inference import probabilities
from cnn.progress import progress
from cnn.train import TrainResult
from cnn.train.evaluation import Predictions, class_metrics

class PlotFigure(Figure):
    """A Figure that a notebook shows inline even when pyplot was never imported."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()


def _figure(width: float, height: float) -> PlotFigure:
    return PlotFigure(figsize=(width, height), layout="constrained")


def _show_image(ax, image: np.ndarray) -> None:
    """Draws an input: a uint8 (H, W, C) image (grayscale in gray, RGB as is), a series (length, channels) as
    one curve per channel, token ids (length,) as a strip; no ticks."""
    if image.ndim == 2:  # a series
        ax.plot(image, linewidth=0.8)
    elif image.ndim == 1:  # token ids
        ax.imshow(image[None], cmap="viridis", aspect="auto", interpolation="nearest")
    elif image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(image[..., :3], interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _is_conv(module: nn.Module, method: str) -> bool:
    """Which calls Flax's intermediates capture keeps: every convolution's, in any model (Sequential or your own)."""
    return isinstance(module, nn.Conv) and method == "__call__"


def _conv_outputs(state, x: jax.Array, variables: dict | None = None) -> list[tuple[tuple[str, ...], jax.Array]]:
    """(module path, output) of every convolution call on `x`, in call order, through Flax's intermediates capture
    (fast kernel paths included: the capture keeps what the kernels' interceptor returned)."""
    _, captured = state.apply_fn(variables or state.variables(), x, train=False, capture_intermediates=_is_conv,
                                 mutable=["intermediates"])
    out = []

    def walk(tree, path):
        for key, value in tree.items():  # in the order the calls were made
            if key == "__call__":  # cnn's Conv(..., with_input=True) returns (output, input)
                out.extend((path, v[0] if isinstance(v, tuple) else v) for v in value)
            else:
                walk(value, (*path, key))

    walk(captured.get("intermediates", {}), ())
    return out


def _conv_layers(run: TrainResult) -> list[tuple[str, ...]]:
    """The module path of every convolution call, in order, found without computing anything."""
    paths = []

    def outputs(state, x):
        pairs = _conv_outputs(state, x)
        paths.extend(path for path, _ in pairs)
        return [a for _, a in pairs]

    jax.eval_shape(outputs, run.state, jax.ShapeDtypeStruct((1, *run.results["input_shape"]), np.float32))
    return paths


# --- Learning curves ----------------------------------------------------------


def learning_curves(history: Sequence[dict], title: str = "", steps: Sequence[dict] = ()) -> Figure:
    """Train and test loss and accuracy against epoch (top) and against wall time (bottom).

    `history` is `run.history`, or the records of WORKDIR/metrics.jsonl;
    `steps` (`run.steps`, WORKDIR/steps.jsonl) adds the training loss of
    every `train.log_every_steps` steps to the loss panels, where an epoch's
    mean hides how the loss moved within it.
    """
    fig = _figure(10, 7)
    axes = fig.subplots(2, 2)
    if not history:
        fig.suptitle(f"{title}: no epochs recorded yet" if title else "no epochs recorded yet")
        return fig
    epochs = [r["epoch"] for r in history]
    seconds = [r.get("elapsed_seconds", 0.0) for r in history]
    unit, scale = ("seconds", 1) if seconds[-1] < 120 else ("minutes", 60) if seconds[-1] < 7200 else ("hours", 3600)
    times = [s / scale for s in seconds]
    marker = "o" if len(history) <= 30 else None  # a one-epoch run still shows its point
    steps_per_epoch = history[-1]["step"] / history[-1]["epoch"]
    steps = [r for r in steps if r["step"] <= history[-1]["step"]]
    step_xs = ([r["step"] / steps_per_epoch for r in steps], [r.get("elapsed_seconds", 0.0) / scale for r in steps])
    for row, (xs, xlabel) in enumerate(((epochs, "epoch"), (times, f"wall time since the run started ({unit})"))):
        for col, (metric, label) in enumerate((("loss", "loss"), ("accuracy", "accuracy"))):
            ax = axes[row, col]
            if metric == "loss" and steps:
                ax.plot(step_xs[row], [r["train_loss"] for r in steps], color="tab:blue", alpha=0.35, linewidth=1,
                        label="train, every few steps")
            for split, colour in (("train", "tab:blue"), ("test", "tab:orange")):
                ys = [r[f"{split}_{metric}"] for r in history]
                ax.plot(xs, ys, marker=marker, markersize=4, color=colour, label=split)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.set_title(f"{label} by {'epoch' if row == 0 else 'wall time'}")
            ax.grid(alpha=0.3)
            if metric == "accuracy":
                ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            if row == 0:
                if len(epochs) <= 12:
                    ax.set_xticks(epochs)  # whole epochs only, even for a one-epoch run
                else:
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_xlim(min([min(epochs) - 0.5, *step_xs[0]]), max(epochs) + 0.5)
            else:
                ax.set_xlim(0, max(times) * 1.05 or 1)
            ax.legend(loc="best")
    last = history[-1]
    fig.suptitle(f"{title + ': ' if title else ''}learning curves, final test accuracy {last['test_accuracy']:.2%} "
                 f"(loss {last['test_loss']:.4f}) after {len(history)} epoch{'s' if len(history) != 1 else ''}")
    return fig


# --- Filters ------------------------------------------------------------------


def filters(run: TrainResult, max_filters: int = 64) -> Figure:
    """The first convolution layer's filters.

    Conv2D: a grid of small images (the first `max_filters`). Grayscale
    inputs: one diverging colour scale shared by all filters (red excites,
    blue inhibits). RGB inputs: each filter as a colour image, scaled to its
    own range. Conv1D: every filter as a row of one image (see `_filter_rows`).
    """
    convs = _conv_layers(run)
    fig = _figure(8, 2)
    if not convs:
        fig.suptitle("this model has no convolution layer")
        return fig
    name = "/".join(convs[0])
    params = run.state.variables()["params"]  # the moving average, when the run kept one: what it predicts with
    kernel = np.asarray(jax.device_get(functools.reduce(lambda tree, key: tree[key], convs[0], params)["kernel"]),
                        np.float32)
    if kernel.ndim == 3:  # Conv1D: (taps, in, filters)
        return _filter_rows(name, kernel)
    count = kernel.shape[-1]
    shown = min(count, max_filters)
    cols = min(shown, 8)
    rows = math.ceil(shown / cols)
    in_channels = kernel.shape[2]
    rgb = in_channels == 3
    fig = _figure(max(1.15 * cols + (1.0 if not rgb else 0.2), 6.0), 1.25 * rows + 0.9)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    limit = float(np.abs(kernel).max()) or 1.0
    image = None
    for i, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= shown:
            ax.set_axis_off()
            continue
        w = kernel[..., i]
        if rgb:
            lo, hi = w.min(), w.max()
            ax.imshow((w - lo) / (hi - lo or 1.0), interpolation="nearest")
        else:
            image = ax.imshow(w.mean(axis=-1), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"{i}", fontsize=8, pad=2)
    if image is not None:
        fig.colorbar(image, ax=axes.tolist(), shrink=0.8, label="weight")
    inputs = {1: "a grayscale input", 3: "RGB input"}.get(in_channels, f"the mean of {in_channels} input channels")
    more = f", first {shown} of {count} shown" if shown < count else ""
    _suptitle(fig, f"First convolution layer ({name}): {count} filters of {kernel.shape[0]}x{kernel.shape[1]} on "
                   f"{inputs}{more}")
    return fig


def _filter_rows(name: str, kernel: np.ndarray) -> Figure:
    """A Conv1D kernel (taps, input channels, filters) as a (filters x taps) image: one row per filter, on one
    diverging colour scale. Up to four input channels get a panel each; more are shown as their mean."""
    taps, in_channels, count = kernel.shape
    panels = [kernel[:, c].T for c in range(in_channels)] if in_channels <= 4 else [kernel.mean(axis=1).T]
    fig = _figure(max(2.2 + 2.4 * len(panels), 7.0), min(max(3.0, 1.6 + 0.035 * count), 9.0))
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    limit = max(float(np.abs(p).max()) for p in panels) or 1.0
    for c, (ax, rows) in enumerate(zip(axes, panels)):
        image = ax.imshow(rows, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("tap")
        if len(panels) > 1:
            ax.set_title(f"input channel {c}", fontsize=9)
    axes[0].set_ylabel("filter")
    fig.colorbar(image, ax=axes.tolist(), shrink=0.8, label="weight")
    inputs = ("1 input channel" if in_channels == 1 else f"{in_channels} input channels" if len(panels) > 1
              else f"the mean of {in_channels} input channels")
    _suptitle(fig, f"First convolution layer ({name}): {count} filters of {taps} taps on {inputs}")
    return fig


def _suptitle(fig: Figure, text: str) -> None:
    """The figure's title, wrapped to the figure's width so a narrow figure never cuts it off."""
    fig.suptitle(textwrap.fill(text, max(int(fig.get_figwidth() * 11), 30)))  # ~11 characters an inch


# --- Feature maps -------------------------------------------------------------


def activations(run: TrainResult, images: np.ndarray, max_layers: int | None = None) -> dict[str, np.ndarray]:
    """Each convolution's output (before any activation) for uint8 `images`, by module path ('conv2d_1',
    'Block_0/Conv_1'), in call order; a module called twice gives 'NAME (2)' for its second call. With
    `max_layers`, that many spread from the first to the last."""
    recipe, names = run.recipe, []

    @jax.jit  # one compilation, not one per operation
    def outputs(state, images):
        pairs = _conv_outputs(state, recipe.inputs(images), recipe.cast(state.variables()))
        calls = collections.Counter()
        for path, _ in pairs:
            calls[path] += 1
            names.append("/".join(path) + (f" ({calls[path]})" if calls[path] > 1 else ""))
        return [a.astype(np.float32) for _, a in pairs]

    arrays = outputs(run.state, np.asarray(images))
    keep = range(len(names)) if max_layers is None or len(names) <= max_layers else \
        sorted(set(np.linspace(0, len(names) - 1, max_layers).round().astype(int).tolist()))
    return {names[i]: np.asarray(arrays[i]) for i in keep}


def feature_maps(run: TrainResult, images: np.ndarray, labels: Sequence[int] | None = None, max_channels: int = 8,
                 probs: np.ndarray | None = None, max_layers: int = 12) -> Figure:
    """What every convolution makes of a few images: one block per image, one row per convolution (at most
    `max_layers`, spread from the first to the last), showing its output before any activation.

    Each row shows the `max_channels` channels most active on these images
    (the same channels for every image, so they compare), labelled by
    layer, output shape and channel number. `probs`, the images' class
    probabilities if already computed, saves computing them again.
    """
    images = np.asarray(images)[:6]
    maps = activations(run, images, max_layers)
    probs = probabilities(run, images) if probs is None else np.asarray(probs)[:6]
    names = list(maps)
    fig = _figure(8, 2)
    if not names:
        fig.suptitle("this model has no convolution layer")
        return fig
    picks = {}
    for name in names:
        a = maps[name]
        strength = a.reshape(len(a), -1, a.shape[-1]).mean(axis=(0, 1))
        picks[name] = np.sort(np.argsort(-strength, kind="stable")[:max_channels])
    cols = 1 + max(len(p) for p in picks.values())
    rows = len(names)
    fig = _figure(1.05 * cols + 0.6, (1.1 * rows + 0.45) * len(images) + 0.5)
    blocks = np.atleast_1d(fig.subfigures(len(images), 1))
    for index, (block, image) in enumerate(zip(blocks, images)):
        predicted = int(np.argmax(probs[index]))
        said = f"predicted {run.class_names[predicted]} ({probs[index, predicted]:.0%})"
        if labels is not None:
            said = f"true {run.class_names[int(labels[index])]}, {said}"
        block.suptitle(f"{'Image' if data_lib.holds_images(images) else 'Example'} {index + 1}: {said}",
                       fontsize=10, fontweight="bold")
        _feature_block(block.subplots(rows, cols, squeeze=False), image, {n: m[index] for n, m in maps.items()},
                       picks)
    fig.suptitle(f"Feature maps: each convolution's output ({cols - 1} most active channels each; "
                 "brighter = stronger)", fontsize=11)
    return fig


def _feature_block(axes: np.ndarray, image: np.ndarray, maps: dict[str, np.ndarray], picks: dict[str, np.ndarray]
                   ) -> None:
    """One image's block: the input, then a row per layer of its picked channels."""
    for r, name in enumerate(maps):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0 or c - 1 >= len(picks[name]):
                if c == 0 and r == 0:
                    _show_image(ax, image)
                    ax.set_title("input", fontsize=8, pad=2)
                else:
                    ax.set_axis_off()
                continue
            channel = int(picks[name][c - 1])
            m = maps[name][..., channel]
            if m.ndim == 1:  # Conv1D: a curve along the sequence
                ax.plot(m, linewidth=0.8)
            else:
                ax.imshow(m, cmap="viridis", interpolation="nearest")
            ax.set_title(f"ch {channel}", fontsize=8, pad=2)
            if c == 1:
                ax.set_ylabel(f"{name}\n{'x'.join(map(str, maps[name].shape))}", fontsize=8)


# --- Confusion matrix and mistakes --------------------------------------------


def _noun(split: data_lib.Split) -> str:
    """What the split's inputs are called in titles: 'images', or 'examples' for series and token ids."""
    return "images" if data_lib.holds_images(split.images) else "examples"


def _probs(run: TrainResult, split: data_lib.Split, probs: np.ndarray | None) -> np.ndarray:
    if probs is None:
        probs = probabilities(run, split.images, description="predicting the test split")
    return probs


def confusion_matrix(run: TrainResult, split: data_lib.Split, probs: np.ndarray | None = None,
                     title: str = "test split") -> Figure:
    """Counts of (true class, predicted class) over `split`, shaded by the fraction of each true class."""
    probs = _probs(run, split, probs)
    n = len(run.class_names)
    predicted = probs.argmax(-1)
    counts = np.zeros((n, n), np.int64)
    np.add.at(counts, (split.labels, predicted), 1)
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    longest = max(len(c) for c in run.class_names)
    side = min(max(5.0, 0.45 * n + 0.07 * longest + 2.5), 14.0)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class", format=PercentFormatter(1.0))
    if n <= 40:
        size = 10 if n <= 20 else 7
        ax.set_xticks(range(n), run.class_names, rotation=45 if longest > 2 else 0, ha="right" if longest > 2
                      else "center", rotation_mode="anchor", fontsize=size)
        ax.set_yticks(range(n), run.class_names, fontsize=size)
    if n <= 25:
        size = 9 if n <= 12 else 7
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, f"{counts[i, j]}", ha="center", va="center", fontsize=size,
                            color="white" if fractions[i, j] > 0.5 else "black")
    index = "" if n <= 40 else " (index into class_names in results.json)"
    ax.set_xlabel(f"predicted class{index}")
    ax.set_ylabel(f"true class{index}")
    accuracy = float(np.trace(counts)) / max(counts.sum(), 1)
    ax.set_title(f"Confusion matrix, {title}: {accuracy:.2%} of {counts.sum():,} {_noun(split)} right")
    return fig


def misclassified(run: TrainResult, split: data_lib.Split, probs: np.ndarray | None = None, max_images: int = 24
                  ) -> Figure:
    """The most confidently wrong examples of `split`, with true and predicted class and the model's confidence."""
    probs = _probs(run, split, probs)
    predicted = probs.argmax(-1)
    wrong = np.flatnonzero(predicted != split.labels)
    confidence = probs[np.arange(len(probs)), predicted]
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:max_images]
    if not len(wrong):
        fig = _figure(6, 2)
        fig.suptitle(f"No misclassified {_noun(split)}: all {len(split):,} are right")
        return fig
    cols = min(len(wrong), 6)
    rows = math.ceil(len(wrong) / cols)
    fig = _figure(1.75 * cols, 2.05 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, i in zip(axes, wrong):
        _show_image(ax, split.images[i])
        ax.set_title(f"true: {run.class_names[split.labels[i]]}\npred: {run.class_names[predicted[i]]} "
                     f"({confidence[i]:.0%})", fontsize=8)
    for ax in axes[len(wrong):]:
        ax.set_axis_off()
    total = int((predicted != split.labels).sum())
    fig.suptitle(f"Misclassified: the {len(wrong)} most confident of {total:,} mistakes in {len(split):,} "
                 f"{_noun(split)}")
    return fig


# --- Where the model looked ---------------------------------------------------


def explain(run: TrainResult, images: np.ndarray, class_index: int | Sequence[int] | None = None,
            explanation: Explanation | None = None, names: Sequence[str] | None = None) -> Figure:
    """One row per input: the input, its Grad-CAM heat map over it, and its gradient saliency map (`grad_cam`).

    Each row is titled with its name (`names`, e.g. file names), the class
    explained and the model's probability for it. `explanation`, if already
    computed for these inputs, saves computing it again.
    """
    ex = explanation if explanation is not None else grad_cam(run, images, class_index)
    images = np.asarray(images).reshape(len(ex.classes), *run.results["input_shape"])
    fig = _figure(9.0, 3.0 * len(images) + 0.4)
    rows = np.atleast_1d(fig.subfigures(len(images), 1))
    for i, (row, image) in enumerate(zip(rows, images)):
        c = int(ex.classes[i])
        name = f"{names[i]}: " if names is not None else f"{'Image' if image.ndim == 3 else 'Example'} {i + 1}: "
        predicted = int(np.argmax(ex.probabilities[i])) == c
        row.suptitle(f"{name}{'predicted' if predicted else 'class'} {run.class_names[c]} "
                     f"({ex.probabilities[i, c]:.1%})", fontsize=10, fontweight="bold")
        axes = row.subplots(1, 3)
        _show_image(axes[0], image)
        axes[0].set_title("input", fontsize=9)
        _map_panel(axes[1], image, ex.heat_maps[i], "jet", f"Grad-CAM over {ex.layer}")
        _map_panel(axes[2], image, None if ex.saliency is None else ex.saliency[i], "magma",
                   "saliency |d logit / d input|")
    fig.suptitle("Where the model looked (1 = most)", fontsize=11)
    return fig


def _map_panel(ax, image: np.ndarray, values: np.ndarray | None, cmap: str, title: str) -> None:
    """A map in [0, 1]: over a grayscale copy of an image, or under a series' curves, or as a strip."""
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if values is None:
        ax.text(0.5, 0.5, "none for token ids", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        return
    if values.ndim == 2:  # an image: the map over it, half transparent
        gray = image.astype(np.float32).mean(-1)
        ax.imshow(gray, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        shown = ax.imshow(values, cmap=cmap, vmin=0, vmax=1, alpha=0.55 if cmap == "jet" else 0.8,
                          interpolation="nearest")
    else:  # a series or token ids: the map as a band along the sequence, the curves over it
        shown = ax.imshow(values[None], cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest",
                          extent=(-0.5, len(values) - 0.5, 0, 1))
        if image.ndim == 2:
            span = np.ptp(image) or 1.0
            ax.plot((image - image.min()) / span, color="white", linewidth=0.8)
    ax.figure.colorbar(shown, ax=ax, shrink=0.8, ticks=(0, 0.5, 1))
# --- Per-class metrics and binary curves ---------------------------------------


def per_class_recall(run: TrainResult, split: data_lib.Split, probs: np.ndarray | None = None,
                     title: str = "test split") -> Figure:
    """Each class's recall on `split` as a bar (the fraction of its examples predicted right), with its count, and
    their mean, the balanced accuracy, as a line: where a rare class is missed, accuracy hides it and this shows it."""
    probs = _probs(run, split, probs)
    metrics = class_metrics(Predictions(split.labels, probs.argmax(-1), probs), run.class_names)
    names = list(metrics["per_class"])
    recall = [metrics["per_class"][n]["recall"] for n in names]
    n, longest = len(names), max(len(c) for c in names)
    fig = _figure(min(max(7.0, 0.42 * n + 2.0), 16.0), 4.5 + (0.08 * min(longest, 30) if n <= 40 else 0))
    ax = fig.subplots()
    bars = ax.bar(range(n), recall, color="tab:blue")
    ax.axhline(metrics["balanced_accuracy"], color="tab:orange", linestyle="--")
    if n <= 40:
        ax.set_xticks(range(n), names, rotation=90 if longest > 2 else 0,  # upright names would overlap
                      fontsize=10 if n <= 20 else 7)
    if n <= 25:
        ax.bar_label(bars, [f"{metrics['per_class'][c]['support']:,}" for c in names], fontsize=8, padding=2)
    ax.set_ylim(0, 1.12)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("true class" + ("" if n <= 40 else " (index into class_names in results.json)"))
    ax.set_ylabel("recall")
    ax.set_title(f"Recall per class, {title}\ndashed: mean recall (balanced accuracy) "
                 f"{metrics['balanced_accuracy']:.2%}" + ("; over the bars: examples" if n <= 25 else ""),
                 fontsize=10)
    return fig


def roc_curve(run: TrainResult, split: data_lib.Split, probs: np.ndarray | None = None) -> Figure:
    """A two-class run's ROC curve on `split`: true against false positive rate as the threshold on class 1's
    probability moves (scikit-learn's roc_curve), with its area."""
    from sklearn import metrics

    probs = _probs(run, split, probs)
    fpr, tpr, _ = metrics.roc_curve(split.labels, probs[:, 1])
    fig = _figure(5.5, 5.2)
    ax = fig.subplots()
    ax.plot(fpr, tpr, color="tab:blue", label=f"AUC {metrics.roc_auc_score(split.labels, probs[:, 1]):.4f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set_xlabel(f"false positive rate (of {run.class_names[0]!s})")
    ax.set_ylabel(f"true positive rate (recall of {run.class_names[1]!s})")
    ax.legend(loc="lower right")
    ax.set_title(f"ROC curve, {len(split):,} test {_noun(split)}")
    return fig


def precision_recall_curve(run: TrainResult, split: data_lib.Split, probs: np.ndarray | None = None) -> Figure:
    """A two-class run's precision-recall curve for class 1 on `split` (scikit-learn's precision_recall_curve), with
    its average precision and the share of class 1, what a classifier that guesses would score."""
    from sklearn import metrics

    probs = _probs(run, split, probs)
    precision, recall, _ = metrics.precision_recall_curve(split.labels, probs[:, 1])
    fig = _figure(5.5, 5.2)
    ax = fig.subplots()
    ap = metrics.average_precision_score(split.labels, probs[:, 1])
    ax.step(recall, precision, where="post", color="tab:blue", label=f"average precision {ap:.4f}")
    share = float(np.mean(split.labels == 1))
    ax.axhline(share, color="grey", linestyle=":", label=f"chance ({share:.1%} are {run.class_names[1]!s})")
    ax.set_xlabel(f"recall of {run.class_names[1]!s}")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower left")
    ax.set_title(f"Precision-recall curve, {len(split):,} test {_noun(split)}")
    return fig


# --- All of them, to files and TensorBoard ----------------------------------------------


def _sample(split: data_lib.Split, count: int) -> np.ndarray:
    """Indices of the first test image of each of `count` different classes (fewer if there are fewer)."""
    _, first = np.unique(split.labels, return_index=True)
    return np.sort(first)[:count]


def write_plots(workdir: str, run: TrainResult, dataset: data_lib.Dataset, num_images: int = 3,
                warn_only: bool = False) -> list[str]:
    """Draws every picture, saves each as WORKDIR/plots/NAME.png and adds it to TensorBoard; returns the paths.

    `warn_only` (training sets it): a failure is one warning line, not an
    error, so a picture never fails a finished training run.
    """
    if warn_only:
        try:
            return write_plots(workdir, run, dataset, num_images)
        except Exception as e:  # noqa: BLE001 - the run's results are already written
            print(f"warning: the pictures could not be drawn ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  f"python -m cnn.visualize --workdir={workdir} retries", file=sys.stderr, flush=True)
            return []
    out_dir = os.path.join(workdir, workdir_lib.PLOTS)
    os.makedirs(out_dir, exist_ok=True)
    test = dataset.test
    probs = probabilities(run, test.images, description="predicting the test split")
    sample = _sample(test, num_images)
    title = dataset.name
    figures = {"learning_curves": lambda: learning_curves(run.history, title, run.steps)}
    if _conv_layers(run):
        figures["filters"] = lambda: filters(run)
        figures["feature_maps"] = lambda: feature_maps(run, test.images[sample], test.labels[sample], probs=probs[sample])
    figures["confusion_matrix"] = lambda: confusion_matrix(run, test, probs)
    figures["misclassified"] = lambda: misclassified(run, test, probs)
    figures["per_class_recall"] = lambda: per_class_recall(run, test, probs)
    if len(run.class_names) == 2 and len(np.unique(test.labels)) == 2:  # both curves need both classes
        figures["roc_curve"] = lambda: roc_curve(run, test, probs)
        figures["precision_recall_curve"] = lambda: precision_recall_curve(run, test, probs)

    paths = []
    step = int(jax.device_get(run.state.step))
    # A file of its own: tensorboardX names files by the second and host, so pictures drawn within a second of
    # training's start (a fast run, compiled steps from the cache) would otherwise overwrite the training's curves.
    with SummaryWriter(logdir=workdir, filename_suffix=".pictures") as writer:
        for name, make in progress(figures.items(), len(figures), "drawing pictures", unit="picture"):
            fig = make()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=110)
            path = os.path.join(out_dir, f"{name}.png")
            workdir_lib.write_atomic(path, buffer.getvalue())
            paths.append(path)
            pixels = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
            writer.add_image(f"plots/{name}", pixels, step, dataformats="HWC")
    print(f"pictures: {', '.join(os.path.basename(p) for p in paths)} in {out_dir} (and TensorBoard)", flush=True)
    return paths

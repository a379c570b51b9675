"""Which test-time views pay: a trained run's test accuracy and loss with the probabilities of several views averaged.

    python -m cnn.main --config=configs/fashion_mnist.py --workdir=runs/fashion --config.data.manual_dir=DIR
    python experiments/tta_views.py --workdir=runs/fashion --manual_dir=DIR

Views: the image as is; its left-right mirror (eval.tta='flip'); four shifts
by one pixel (zeros shifted in, as data.crop_padding pads); and the mirror's
four shifts. Only 'flip' is offered as eval.tta; docs/configs.md reports what
this measured on Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

import cnn
from cnn.inference import probabilities
from cnn.run import read_config

SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """uint8 images (N, H, W, C) moved by (dy, dx) pixels, zeros shifted in."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a finished image run")
    parser.add_argument("--manual_dir", help="data.manual_dir for its dataset, if it needs one")
    args = parser.parse_args()
    run = cnn.load_run(args.workdir)
    run = dataclasses.replace(run, recipe=dataclasses.replace(run.recipe, tta=None))  # the views are made here
    data = read_config(args.workdir).data
    if args.manual_dir:
        data.manual_dir = args.manual_dir
    test = cnn.load_dataset(data).test
    x, y = test.images, test.labels
    probs = {"id": probabilities(run, x), "flip": probabilities(run, x[:, :, ::-1])}
    for dy, dx in SHIFTS:
        probs[f"shift{dy},{dx}"] = probabilities(run, shift(x, dy, dx))
        probs[f"flip shift{dy},{dx}"] = probabilities(run, shift(x[:, :, ::-1], dy, dx))
    shifts = [f"shift{dy},{dx}" for dy, dx in SHIFTS]
    views = {"none": ["id"], "flip": ["id", "flip"], "4 one-pixel shifts": ["id", *shifts],
             "flip and shifts (10 views)": ["id", "flip", *shifts, *(f"flip {s}" for s in shifts)]}
    print(f"{'views':<28} accuracy  loss")
    for name, keys in views.items():
        p = np.mean([probs[k] for k in keys], axis=0)
        loss = float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean())
        print(f"{name:<28} {float((p.argmax(-1) == y).mean()):>8.2%}  {loss:.4f}")


if __name__ == "__main__":
    main()

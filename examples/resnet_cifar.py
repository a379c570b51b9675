"""A small ResNet written as a plain Flax module, for cnn to train (config.model.module).

    cnn train --config=configs/cifar10.py --workdir=runs/own_resnet --config.model.layers='()' \
        --config.model.module='examples/resnet_cifar.py:ResNet(widths=(16, 32, 64), blocks=3)'

That is He et al. (2016)'s ResNet-20 for CIFAR-10, with 1x1 convolutions on
the shortcuts that change size. cnn calls `ResNet(num_classes=N, ...)` with
the dataset's class count and the arguments written in the reference, and
trains `__call__(x, train)`: it returns logits, one per class. Copy this file,
change the layers, and point model.module at your copy.
"""

import flax.linen as nn
import jax.numpy as jnp


class Block(nn.Module):
    """Two 3x3 convolutions with batch norm, plus a shortcut; the first convolution may halve the size."""

    width: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
        y = nn.relu(norm()(nn.Conv(self.width, (3, 3), self.strides, use_bias=False)(x)))
        y = norm()(nn.Conv(self.width, (3, 3), use_bias=False)(y))
        if x.shape != y.shape:  # a 1x1 convolution brings the shortcut to the new size and width
            x = norm()(nn.Conv(self.width, (1, 1), self.strides, use_bias=False)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A stem convolution, `blocks` Blocks per width (each new width halves the size), then average and classify."""

    num_classes: int
    widths: tuple = (16, 32, 64)
    blocks: int = 3
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.widths[0], (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for stage, width in enumerate(self.widths):
            for block in range(self.blocks):
                x = Block(width, strides=2 if stage > 0 and block == 0 else 1)(x, train)
        x = jnp.mean(x, axis=(1, 2))  # global average pooling
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)

"""Your own Flax module on the 8x8 digits (offline): examples/resnet_cifar.py's ResNet, two widths, one block each.

The reference is "FILE.py:Name(arguments)"; a relative FILE is read from the
working directory, so this config names the example by its place beside the
config file, and works from anywhere.
"""

import os

from cnn.config import base_config

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "resnet_cifar.py")


def get_config():
    config = base_config()
    config.data.name = "digits"
    config.model.layers = ()  # the module replaces the layer specs
    config.model.module = f"{os.path.normpath(EXAMPLE)}:ResNet(widths=(16, 32), blocks=1)"
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3
    config.train.num_epochs = 10
    config.train.batch_size = 32
    return config

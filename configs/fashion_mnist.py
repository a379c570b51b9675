"""Fashion-MNIST with the same CNN and recipe as configs/mnist.py."""

import os

from cnn.config import load


def get_config():
    config = load(os.path.join(os.path.dirname(__file__), "mnist.py"))
    config.data.name = "fashion_mnist"
    return config

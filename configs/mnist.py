"""MNIST with the classic Flax example CNN."""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "mnist"
    return config

"""Kuzushiji-MNIST (28x28 cursive Japanese characters, 10 classes) with the MNIST CNN and recipe."""

import os

from cnn.config import load_config


def get_config():
    config = load_config(os.path.join(os.path.dirname(__file__), "mnist.py"))
    config.data.name = "kmnist"
    return config

"""EMNIST Letters (28x28 handwritten letters) with the Flax example CNN.

TFDS gives this set 37 classes though only labels 1 to 26 (a to z, upper and
lower case merged) occur, so the output layer has 37 units; the unused ones
simply learn never to win. The images are stored transposed; a CNN does not
care, but plots of them look mirrored.
"""

import os

from cnn.config import load_config


def get_config():
    config = load_config(os.path.join(os.path.dirname(__file__), "mnist.py"))
    config.data.name = "emnist/letters"
    config.model.layers = ()
    config.model.preset = "flax_cnn"
    config.model.num_classes = 37
    return config

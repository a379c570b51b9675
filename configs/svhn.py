"""SVHN cropped digits (32x32x3, 10 classes, 73,257 train / 26,032 test) with ResNet-20.

No horizontal flip: a mirrored 2 is not a 2. A small random crop still helps.
"""

import os

from cnn.config import load_config


def get_config():
    config = load_config(os.path.join(os.path.dirname(__file__), "resnet20.py"))
    config.data.name = "svhn_cropped"
    config.data.mean = (0.4377, 0.4438, 0.4728)
    config.data.std = (0.1980, 0.2010, 0.1970)
    config.data.crop_padding = 2
    config.data.flip = False
    config.train.num_epochs = 40
    return config

"""VGG-16 with batch norm on CIFAR-10: 14,728,266 parameters, as in kuangliu/pytorch-cifar (92.64% there).

Narrower or shallower nets: --config.model.preset="vgg(widths=(32, 64, 128), depths=(2, 2, 2))".
"""

import os

from cnn.config import load_config


def get_config():
    config = load_config(os.path.join(os.path.dirname(__file__), "cifar10.py"))
    config.model.preset = "vgg"
    config.optimizer.learning_rate = 0.05
    config.optimizer.weight_decay = 5e-4
    config.train.num_epochs = 200
    return config

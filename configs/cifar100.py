"""CIFAR-100 (32x32x3, 100 fine classes) with ResNet-20 and CIFAR-10's recipe.

He et al. do not report CIFAR-100; ResNet-20 commonly lands near 68-69% here.
"""

import os

from cnn.config import load_config


def get_config():
    config = load_config(os.path.join(os.path.dirname(__file__), "resnet20.py"))
    config.data.name = "cifar100"
    config.data.mean = (0.5071, 0.4865, 0.4409)
    config.data.std = (0.2673, 0.2564, 0.2762)
    config.model.num_classes = 100
    return config

"""ResNet-20 on CIFAR-10, the recipe of He et al. (2016) section 4.2: 269,722 parameters.

SGD with momentum 0.9, weight decay 1e-4, batch 128, learning rate 0.1; the
paper divides it by 10 at 32k and 48k iterations and stops at 64k (~182
epochs); a cosine decay over 180 epochs does as well. Published: 8.75% test
error (91.25% accuracy).
"""

import os

from cnn.config import load_config


def get_config():
    config = load_config(os.path.join(os.path.dirname(__file__), "cifar10.py"))
    config.model.preset = "resnet20"
    config.optimizer.learning_rate = 0.1
    config.optimizer.weight_decay = 1e-4
    config.train.num_epochs = 180
    return config

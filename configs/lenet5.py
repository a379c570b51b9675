"""LeNet-5 (LeCun et al. 1998) on MNIST: 61,706 parameters (see cnn/presets.py for the variant).

The paper reaches 0.95% test error (99.05% accuracy) without distortions.
Here: Adam, batch 128, a cosine decay over 10 epochs.
"""

import os

from cnn.config import load


def get_config():
    config = load(os.path.join(os.path.dirname(__file__), "mnist.py"))
    config.model.layers = ()
    config.model.preset = "lenet5"
    config.model.num_classes = 10
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 0.0
    return config

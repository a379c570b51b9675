"""LeNet-5 (LeCun et al. 1998) on MNIST: 61,706 parameters (see cnn/models/presets.py for the variant).

The paper reaches 0.95% test error (99.05% accuracy) without distortions.
Here: Adam 2e-3, batch 128, a short warmup and cosine decay over 6 epochs,
one-pixel random shifts (its accuracy: docs/presets.md).
"""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "mnist"
    config.data.crop_padding = 1
    config.model.layers = ()
    config.model.preset = "lenet5"
    config.model.num_classes = 10
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.schedule = "warmup_cosine"
    config.optimizer.warmup_epochs = 0.2
    config.train.num_epochs = 6
    return config

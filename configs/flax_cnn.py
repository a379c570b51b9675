"""MNIST with the Flax example's CNN and recipe: the `flax_cnn` preset, constant
SGD 0.1 with momentum 0.9, batch 128, 10 epochs, no weight decay or schedule.
The peer in experiments/benchmark.py and the flax_cnn row of the presets table.
"""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "mnist"
    config.model.layers = ()
    config.model.preset = "flax_cnn"
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.schedule = "constant"
    config.train.batch_size = 128
    config.train.num_epochs = 10
    return config

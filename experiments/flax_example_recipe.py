"""The Flax MNIST example's recipe, the peer in experiments/benchmark.py:
its CNN, constant SGD 0.1 with momentum 0.9, batch 128, 10 epochs, no
weight decay or schedule.
"""

from cnn.config import base_config


def get_config():
    config = base_config()  # its model is the Flax example CNN
    config.data.name = "mnist"
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.schedule = "constant"
    config.train.batch_size = 128
    config.train.num_epochs = 10
    return config

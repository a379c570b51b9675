"""MNIST with the classic Flax example CNN (conv 32, avg-pool, conv 64,
avg-pool, dense 256, dense 10) and its SGD recipe (lr 0.1, momentum 0.9,
batch 128), plus a one-epoch warmup, cosine decay and a little weight decay.
Ends at 99.36% test accuracy after 10 epochs (see README).
"""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "mnist"
    config.optimizer.schedule = "warmup_cosine"
    config.optimizer.warmup_epochs = 1.0
    config.optimizer.weight_decay = 1e-4
    config.train.num_epochs = 10
    return config

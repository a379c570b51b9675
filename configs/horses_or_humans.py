"""A two-class set for the sigmoid head: horses_or_humans (300x300 renders, resized to 64x64).

The binary Keras seed model, widened to three conv stages, one sigmoid unit
and binary cross-entropy with Adam.
"""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "horses_or_humans"
    config.data.image_size = (64, 64)
    config.data.flip = True
    config.model.layers = ()
    config.model.preset = "keras_seed_binary(widths=(32, 64, 128))"
    config.model.num_classes = 2
    config.loss = "sigmoid_binary_cross_entropy"
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.train.num_epochs = 15
    config.train.batch_size = 32
    return config

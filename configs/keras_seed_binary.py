"""The binary Keras seed model: one sigmoid unit, binary cross-entropy, Adam.

Keras: the model of keras_seed.py ending in Dense(1, activation='sigmoid'),
compiled with optimizer='adam', loss='binary_crossentropy': 3,937,409
parameters. Data: horses_or_humans (two classes), resized to 64x64.
"""

import os

from cnn.config import load_config


def get_config():
    config = load_config(os.path.join(os.path.dirname(__file__), "keras_seed.py"))
    config.data.name = "horses_or_humans"
    config.data.train_split = "train"
    config.data.test_split = "test"
    config.data.image_size = (64, 64)
    config.model.preset = "keras_seed_binary"
    config.model.num_classes = 2
    config.loss = "sigmoid_binary_cross_entropy"
    return config

"""Time series: 'synthetic_series' (noisy sine, square, sawtooth and triangle waves of 128 steps) with a 1D CNN.

Generated from a fixed seed (cnn/data/embedded.py), so it runs offline.
"""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "synthetic_series"
    config.data.max_length = 128
    config.model.layers = (
        "Conv1D(32, 7, activation='relu', padding='same')",
        "MaxPooling1D(2)",
        "Conv1D(64, 5, activation='relu', padding='same')",
        "MaxPooling1D(2)",
        "Conv1D(64, 3, activation='relu', padding='same')",
        "GlobalAveragePooling1D()",
        "Dense(4)",
    )
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3
    config.train.num_epochs = 10
    config.train.batch_size = 64
    return config

"""The 8x8 digits inside scikit-learn: offline, seconds, >= 95% test accuracy."""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "digits"
    config.model.layers = (
        "Conv2D(32, 3, activation='relu', padding='same')",
        "Conv2D(32, 3, activation='relu', padding='same')",
        "MaxPooling2D(2)",
        "Flatten()",
        "Dense(128, activation='relu')",
        "Dense(10)",
    )
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3
    config.train.num_epochs = 15
    config.train.batch_size = 32
    return config

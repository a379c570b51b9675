"""The Keras seed model on EuroSAT RGB (64x64x3, 10 land-use classes).

Keras: Conv2D(32, (3, 3), activation='relu', input_shape=(64, 64, 3)),
MaxPooling2D((2, 2)), Flatten(), Dense(128, activation='relu'),
Dense(10, activation='softmax'): 3,938,570 parameters.
EuroSAT has only a 'train' split: the last 20% is held out for testing.
"""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "eurosat/rgb"
    config.data.train_split = "train[:80%]"
    config.data.test_split = "train[80%:]"
    config.model.layers = ()
    config.model.preset = "keras_seed"  # these five layers, as cnn/models/presets.py writes them
    config.model.num_classes = 10
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.train.num_epochs = 10
    config.train.batch_size = 64
    return config

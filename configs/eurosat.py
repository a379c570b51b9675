"""EuroSAT RGB (64x64x3 Sentinel-2 tiles, 10 land-use classes) with ResNet-20.

Only a 'train' split exists: the last 20% is held out for testing, as in
keras_seed.py. Satellite tiles have no up or left, so flips are safe.
"""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "eurosat/rgb"
    config.data.train_split = "train[:80%]"
    config.data.test_split = "train[80%:]"
    config.data.crop_padding = 4
    config.data.flip = True
    config.model.layers = ()
    config.model.preset = "resnet20"
    config.model.num_classes = 10
    config.optimizer.schedule = "warmup_cosine"
    config.optimizer.warmup_epochs = 1.0
    config.optimizer.weight_decay = 1e-4
    config.train.num_epochs = 30
    return config

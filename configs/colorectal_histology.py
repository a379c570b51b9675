"""Medical imaging: colorectal_histology (Kather et al. 2016), 5,000 150x150 tissue patches in 8 classes.

Resized to 64x64; only a 'train' split exists, so the last 20% is the test
set. Histology slides have no orientation, so flips are safe. The paper's
best texture-feature classifier reached 87.4% on the 8 classes.
"""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "colorectal_histology"
    config.data.train_split = "train[:80%]"
    config.data.test_split = "train[80%:]"
    config.data.image_size = (64, 64)
    config.data.crop_padding = 4
    config.data.flip = True
    config.model.layers = ()
    config.model.preset = "vgg(widths=(32, 64, 128, 256), depths=(1, 1, 2, 2))"
    config.model.num_classes = 8
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.train.num_epochs = 30
    config.train.batch_size = 64
    return config

"""CIFAR-10 (32x32x3, 10 classes): the dataset's usual preprocessing, with the Flax example CNN.

Per-channel normalisation with the training set's mean and std, and the
standard augmentation (pad 4 and crop back to 32x32, random horizontal flip;
cnn.data.augment does it, inside the compiled training step).
resnet20.py and vgg.py start from here and change the model and recipe.
"""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "cifar10"
    config.data.mean = (0.4914, 0.4822, 0.4465)
    config.data.std = (0.2470, 0.2435, 0.2616)
    config.data.crop_padding = 4
    config.data.flip = True
    config.model.layers = ()
    config.model.preset = "flax_cnn"
    config.model.num_classes = 10
    config.optimizer.schedule = "warmup_cosine"
    config.optimizer.warmup_epochs = 1.0
    config.optimizer.weight_decay = 5e-4
    config.optimizer.learning_rate = 0.05
    config.train.num_epochs = 30
    return config

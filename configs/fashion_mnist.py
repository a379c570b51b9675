"""Fashion-MNIST: the batch-norm CNN at the Flax example's width (conv 32,
conv 64, dense 128), Adam 3e-3 with a short warmup and one cosine decay over
6 epochs, and a one-pixel random shift. configs/mnist.py halves the widths
and anneals early to reach 99% on MNIST fast; Fashion-MNIST is harder and
gains from the wider net and the gentler learning rate, and its sweep
(experiments/fashion_architectures.py) swaps in presets without batch norm,
for which Adam 1e-2 is too large.

It sets none of the recipe tricks (label smoothing, mixup, cutmix, EMA,
flip TTA, clipping, one-cycle): experiments/recipes.py measured each of
them, alone and together, over three seeds, and none beat this recipe by
more than its seed spread at six epochs (docs/configs.md has the table).

Offline and without TensorFlow: --config.data.manual_dir=FOLDER, a folder
holding Fashion-MNIST's four original archives (train-images-idx3-ubyte.gz,
...).
"""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "fashion_mnist"
    config.data.crop_padding = 1
    config.model.layers = (
        "Conv2D(32, 3, padding='same', use_bias=False)", "BatchNormalization(momentum=0.9)", "Activation('relu')",
        "AveragePooling2D(2)",
        "Conv2D(64, 3, padding='same', use_bias=False)", "BatchNormalization(momentum=0.9)", "Activation('relu')",
        "AveragePooling2D(2)",
        "Flatten()",
        "Dense(128, activation='relu')",
        "Dense(10)",
    )
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.schedule = "warmup_cosine"
    config.optimizer.warmup_epochs = 0.2
    config.train.num_epochs = 6
    return config

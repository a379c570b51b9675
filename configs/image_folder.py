"""Your own images sorted into class folders (ROOT/<class>/<files>), with the Flax example's CNN.

The preset's output layer takes the folders' class count, so the same
config fits any folder. Images of different sizes need data.image_size.

    python -m cnn.main --config=configs/image_folder.py --workdir=runs/scans \\
      --config.data.path=scans/train --config.data.image_size='(64, 64)'
"""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "image_folder"
    config.model.layers = ()
    config.model.preset = "flax_cnn"
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.train.num_epochs = 10
    config.train.batch_size = 32
    return config

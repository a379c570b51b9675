"""Learning rate x batch size for the Flax example CNN on MNIST (SGD with momentum 0.9, as in
configs/flax_cnn.py).

A grid of 4 x 3 = 12 trials of 2 epochs each (warmup, then cosine decay to 0), so every
trial is a complete short schedule: about 12 minutes of training on a 2-core
CPU in total. Without a network, add --config.data.manual_dir=../shared/datasets/mnist.

    python -m cnn.sweep experiments/mnist_lr_batch.py --workdir=runs/mnist_lr_batch
"""


def get_sweep():
    return dict(
        config="configs/flax_cnn.py",
        fixed={"train.num_epochs": 2, "optimizer.schedule": "warmup_cosine", "optimizer.warmup_epochs": 0.3},
        space={"optimizer.learning_rate": [0.01, 0.03, 0.1, 0.3], "train.batch_size": [32, 128, 512]},
        metric="test_accuracy",
    )

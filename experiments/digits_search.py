"""TPE over Adam's learning rate and the batch size on the 8x8 digits: 12 trials of 3 epochs.

    python -m cnn.sweep experiments/digits_search.py --workdir=runs/digits_search --workers=2 [--pruner=median]

The first 4 trials are drawn at random; TPE then samples where the good ones
were. Start the same command on other machines with a shared --storage to
search together.
"""

from cnn.sweep import log_uniform


def get_sweep():
    return dict(
        config="configs/digits.py",
        fixed={"train.num_epochs": 3},
        space={"optimizer.learning_rate": log_uniform(1e-4, 3e-2), "train.batch_size": [16, 32, 64]},
        metric="test_accuracy",
        n_trials=12,
        startup_trials=4,
    )

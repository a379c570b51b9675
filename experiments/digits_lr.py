"""Adam's learning rate on the 8x8 digits: three short trials that finish in about a minute on a laptop.

    python -m cnn.sweep experiments/digits_lr.py --workdir=runs/digits_lr --parallel=2
"""

from cnn.sweep import product


def get_sweep():
    return dict(
        config="configs/digits.py",
        fixed={"train.num_epochs": 3},
        trials=product({"optimizer.learning_rate": [1e-3, 3e-3, 1e-2]}),
        metric="test_accuracy",
    )

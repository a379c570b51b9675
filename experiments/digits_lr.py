"""Adam's learning rate on the 8x8 digits: a grid of three short trials, about a minute on a laptop.

    python -m cnn.sweep experiments/digits_lr.py --workdir=runs/digits_lr --workers=2
"""


def get_sweep():
    return dict(
        config="configs/digits.py",
        fixed={"train.num_epochs": 3},
        space={"optimizer.learning_rate": [1e-3, 3e-3, 1e-2]},
        metric="test_accuracy",
    )

"""Four architectures on Fashion-MNIST, each with the same recipe (configs/fashion_mnist.py) and 5 epochs.

flax_cnn: the Flax example CNN; keras_seed: the Keras seed model (one conv,
one pooling, dense 128); lenet5: LeNet-5; vgg: a deeper VGG-style net. The
ranked table gives test accuracy, and results.csv also has each model's
parameter count and training time. Without a network, add
--config.data.manual_dir=../shared/datasets/fashion_mnist.

    python -m cnn.sweep experiments/fashion_architectures.py --workdir=runs/fashion_architectures
"""


def get_sweep():
    return dict(
        config="configs/fashion_mnist.py",
        fixed={"train.num_epochs": 5, "model.layers": ()},  # the preset replaces the config's layers
        space={"model.preset": ["flax_cnn", "keras_seed", "lenet5", "vgg"]},
        metric="test_accuracy",
    )

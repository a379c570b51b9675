"""IMDB movie reviews (25,000 train / 25,000 test, positive or negative) with a 1D CNN.

Words are lowercased, the 20,000 most frequent in the training split get ids
(0 pads, 1 stands for any other word) and each review keeps its first 256
words. Embedding, one Conv1D, global max pooling and a sigmoid unit: the
classic Keras text CNN, which reaches about 88-89% test accuracy.
"""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "imdb_reviews"
    config.data.vocab_size = 20000
    config.data.max_length = 256
    config.model.layers = (
        "Embedding(20000, 64)",
        "Dropout(0.2)",
        "Conv1D(128, 5, activation='relu')",
        "GlobalMaxPooling1D()",
        "Dense(64, activation='relu')",
        "Dropout(0.5)",
        "Dense(1, activation='sigmoid')",
    )
    config.loss = "sigmoid_binary_cross_entropy"
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.train.num_epochs = 3
    config.train.batch_size = 64
    return config

"""Training: the state, the optimizer, the compiled steps, checkpoints, metrics and the loop.

Read in this order: state.py (what a step reads and the loop carries),
steps.py (one step: part_gradients, apply_update; compile_train_step),
optimizer.py, setup.py (from a config to a frozen plan, `Training`, and the
first state), loop.py (`train_and_evaluate`: set-up, epochs, evaluation,
finish), monitor.py (its end-of-epoch decisions: best epoch, best checkpoint,
early stop), folds.py (`cross_validate`: a run per fold). The losses a
config names are in cnn/losses.py.
"""

from cnn.train import checkpoint
from cnn.train.evaluation import evaluate
from cnn.train.loop import TrainResult, train_and_evaluate
from cnn.train.optimizer import make_optimizer
from cnn.train.setup import Training, prepare, summary
from cnn.train.state import EpochSums, TrainState, create_state
from cnn.train.steps import (Gradients, Recipe, add_part, apply_update, compile_eval_step, compile_train_step,
                             class_probabilities, compute_loss, eval_step, part_gradients, probabilities_fn,
                             train_step)

__all__ = ["EpochSums", "Gradients", "Recipe", "TrainResult", "TrainState", "Training", "add_part", "apply_update",
           "checkpoint", "class_probabilities", "compile_eval_step", "compile_train_step", "compute_loss",
           "create_state", "eval_step", "evaluate", "make_optimizer", "part_gradients", "prepare", "probabilities_fn",
           "summary", "train_and_evaluate", "train_step"]

"""Training: the state, the optimizer, the compiled steps, checkpoints, metrics and the loop.

Read in this order: state.py (what a step reads), steps.py (the compiled
steps and their Recipe), optimizer.py, setup.py (from a config to a ready
run), loop.py (`train_and_evaluate`: set-up, epochs, evaluation, finish).
"""

from cnn.train import checkpoint
from cnn.train.loop import TrainResult, evaluate, train_and_evaluate
from cnn.train.optimizer import make_optimizer
from cnn.train.setup import Training, prepare, summary
from cnn.train.state import TrainState, create_state
from cnn.train.steps import (Recipe, accumulate_part, apply_accumulated, batch_gradients, class_probabilities,
                             compile_eval_step, compile_train_step, compute_loss, empty_accumulator, eval_step,
                             probabilities_fn, train_chunk_step, train_step, train_step_and_sum)

__all__ = ["Recipe", "TrainResult", "TrainState", "Training", "accumulate_part", "apply_accumulated",
           "batch_gradients", "checkpoint", "class_probabilities", "compile_eval_step", "compile_train_step",
           "compute_loss", "create_state", "empty_accumulator", "eval_step", "evaluate", "make_optimizer", "prepare",
           "probabilities_fn", "summary", "train_and_evaluate", "train_chunk_step", "train_step",
           "train_step_and_sum"]

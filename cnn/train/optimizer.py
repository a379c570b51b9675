"""The optax optimizer and learning-rate schedule that `config.optimizer` names."""

from __future__ import annotations

import jax
import ml_collections
import optax

from cnn.errors import ConfigError


def make_optimizer(opt: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int
                   ) -> optax.GradientTransformation:
    """SGD, Adam or AdamW, with a constant rate or warmup-cosine cycles (one per span between restarts)."""
    # A constant rate stays a number: a schedule would add a step count to the optimizer state (and checkpoints).
    lr = learning_rate_schedule(opt, steps_per_epoch, num_epochs) if opt.schedule == "warmup_cosine" \
        else opt.learning_rate
    if opt.name == "adamw":
        return optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
    tx = optax.adam(lr, b1=opt.b1, b2=opt.b2) if opt.name == "adam" else optax.sgd(
        lr, momentum=opt.momentum or None, nesterov=opt.nesterov)
    return optax.chain(optax.add_decayed_weights(opt.weight_decay), tx) if opt.weight_decay else tx


def learning_rate_schedule(opt: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int
                           ) -> optax.Schedule:
    """The rate of each update as a function of optax's count (0 for the first update), as `make_optimizer` uses it."""
    if opt.schedule != "warmup_cosine":
        return optax.constant_schedule(opt.learning_rate)
    restarts = [e for e in opt.restart_epochs if e < num_epochs]  # a shortened run keeps the cycles that fit
    bounds = [round(e * steps_per_epoch) for e in (0, *restarts, num_epochs)]
    if any(end <= begin for begin, end in zip(bounds, bounds[1:])):
        raise ConfigError(f"optimizer.restart_epochs={tuple(restarts)} leaves a cycle without a step "
                          f"(an epoch is {steps_per_epoch} steps); space the restarts further apart")
    cycles = [{"init_value": 0.0, "peak_value": opt.learning_rate, "end_value": 0.0, "decay_steps": end - begin,
               # Capped so a short cycle (or --config.train.num_epochs=1) still has a decay.
               "warmup_steps": min(int(opt.warmup_epochs * steps_per_epoch), end - begin - 1)}
              for begin, end in zip(bounds, bounds[1:])]
    return optax.sgdr_schedule(cycles)


def host_learning_rate(schedule: optax.Schedule, count: int) -> float:
    """`schedule(count)` computed on the host's CPU device, so logging the rate never waits for a training step."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return float(schedule(count))

"""The optax optimizer and learning-rate schedule that `config.optimizer` names."""

from __future__ import annotations

import jax
import ml_collections
import optax

from cnn.errors import ConfigError
import cnn.models.head as head_lib


def make_optimizer(opt: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int, head: str | None = None,
                   freeze_epochs: int = 0) -> optax.GradientTransformation:
    """SGD, Adam or AdamW, with a constant rate or warmup-cosine cycles (one per span between restarts).

    With a `head` (the layer cnn.models.head names; a fine-tuning run) the
    rest of the model, the backbone, gets its own copy of the optimizer
    (optax.multi_transform): its whole update (momentum, Adam's moments and
    weight decay included) scaled by `opt.backbone_lr_scale`, which is the
    same as scaling its learning rate; and for the first `freeze_epochs`
    epochs a zero update with its state left as it was, so frozen weights and
    their momentum do not move. The optimizer's own step count decides the
    phase, so a resumed run switches at the same step. A scale of 0 freezes
    the backbone throughout.
    """
    scale = opt.get("backbone_lr_scale", 1.0)
    if head is None or (scale == 1.0 and not freeze_epochs):
        return _optimizer(opt, steps_per_epoch, num_epochs)
    freeze_steps = freeze_epochs * steps_per_epoch
    if scale == 0:
        backbone = optax.set_to_zero()
    else:  # its schedule is read at the global step, though its own count starts when it thaws
        backbone = optax.chain(_optimizer(opt, steps_per_epoch, num_epochs, shift=freeze_steps), optax.scale(scale))
        if freeze_steps:
            backbone = optax.transforms.conditionally_mask(backbone, lambda count: count >= freeze_steps)
    return optax.multi_transform({"head": _optimizer(opt, steps_per_epoch, num_epochs), "backbone": backbone},
                                 lambda params: head_lib.labels(params, head))


def _optimizer(opt: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int, shift: int = 0
               ) -> optax.GradientTransformation:
    """make_optimizer's transformation for all parameters alike; its schedule read `shift` updates later."""
    # A constant rate stays a number: a schedule would add a step count to the optimizer state (and checkpoints).
    lr = learning_rate_schedule(opt, steps_per_epoch, num_epochs) if opt.schedule == "warmup_cosine" \
        else opt.learning_rate
    if shift and callable(lr):
        lr = lambda count, schedule=lr: schedule(count + shift)
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

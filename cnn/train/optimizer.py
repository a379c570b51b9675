"""The optax optimizer and learning-rate schedule that `config.optimizer` names.

`make_optimizer` is the whole update: gradient clipping (optimizer.clip_norm),
then `optimizer_for`, the optax optimizer itself. A wrapper that treats
parameter groups differently (optax.multi_transform) wraps `optimizer_for`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import ml_collections
import optax

from cnn.config import OPTIMIZER_FIELDS
from cnn.errors import ConfigError
import cnn.models.head as head_lib


def make_optimizer(opt: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int, head: str | None = None,
                   freeze_epochs: int = 0) -> optax.GradientTransformation:
    """The optimizer at the schedule's rate, after clipping the gradients' global norm if optimizer.clip_norm > 0.

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
    clip = opt.get("clip_norm", 0.0)  # .get: config.json of runs from before the field
    tx = _by_part(opt, steps_per_epoch, num_epochs, head, freeze_epochs)
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx  # the whole model's norm


def _by_part(opt: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int, head: str | None,
             freeze_epochs: int) -> optax.GradientTransformation:
    """make_optimizer's transformation: one for all parameters, or the head's and the backbone's."""
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
    lr = learning_rate_schedule(opt, steps_per_epoch, num_epochs) if opt.schedule != "constant" \
        else opt.learning_rate
    if shift and callable(lr):
        lr = lambda count, schedule=lr: schedule(count + shift)
    return optimizer_for(opt, lr)


def optax_function(name: str) -> Callable[..., optax.GradientTransformation]:
    """optax's optimizer `name` (muon lives in optax.contrib in the optax versions cnn supports)."""
    return getattr(optax, name, None) or getattr(optax.contrib, name)


def optimizer_for(opt: ml_collections.ConfigDict, learning_rate: float | optax.Schedule
                  ) -> optax.GradientTransformation:
    """optax's `opt.name` at `learning_rate` with the config's hyperparameters: the fields that optimizer reads
    (cnn.config.OPTIMIZER_FIELDS), weight_decay, and optimizer.args, checked against optax's signature.

    weight_decay goes to optimizers that take it (decoupled: adamw, lamb,
    lion, muon); for the others it is added to the gradients first
    (optax.add_decayed_weights), as before for sgd and adam.
    """
    function = optax_function(opt.name)
    accepted = inspect.signature(function).parameters
    kwargs = {field: opt[field] for field in OPTIMIZER_FIELDS.get(opt.name, ())}
    if opt.name == "sgd":
        kwargs["momentum"] = opt.momentum or None  # optax's sgd has no momentum buffer for None
    decayed = "weight_decay" in accepted
    if decayed:
        kwargs["weight_decay"] = opt.weight_decay
    args = dict(opt.get("args") or {})
    _check_args(opt.name, args, accepted, set(kwargs))
    try:
        tx = function(learning_rate, **kwargs, **args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer.args={args}: optax.{opt.name} refused them ({str(e).splitlines()[0]})") from None
    return optax.chain(optax.add_decayed_weights(opt.weight_decay), tx) if opt.weight_decay and not decayed else tx


def _check_args(name: str, args: dict, accepted, fields: set[str]) -> None:
    """Each key of optimizer.args must be a parameter of optax's function that no config field sets already."""
    own = {"learning_rate", *fields}
    takes = [p for p in accepted if p not in own]
    for key in args:
        if key in own:
            raise ConfigError(f"optimizer.args sets {key!r}, which the field optimizer.{key} sets for {name}; set "
                              f"optimizer.{key} instead")
        if key not in accepted:
            raise ConfigError(f"optimizer.args: optax.{name} has no parameter {key!r}; it takes "
                              f"{', '.join(takes) or 'none'}")


def learning_rate_schedule(opt: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int
                           ) -> optax.Schedule:
    """The rate of each update as a function of optax's count (0 for the first update), as `make_optimizer` uses it
    and the step records log it."""
    lr, total = opt.learning_rate, steps_per_epoch * num_epochs
    if opt.schedule == "warmup_cosine":
        return _warmup_cosine(opt, steps_per_epoch, num_epochs)
    if opt.schedule == "step":
        scales: dict[int, float] = {}
        for epoch in opt.boundaries_epochs:  # two boundaries in one step multiply there
            step = round(epoch * steps_per_epoch)
            scales[step] = scales.get(step, 1.0) * opt.decay_factor
        return optax.piecewise_constant_schedule(lr, scales)
    if opt.schedule == "one_cycle":
        return optax.cosine_onecycle_schedule(total, lr, pct_start=opt.warmup_epochs / num_epochs or 0.3)
    if opt.schedule == "linear":
        return optax.linear_schedule(lr, 0.0, total)
    if opt.schedule == "exponential":
        return optax.exponential_decay(lr, transition_steps=steps_per_epoch, decay_rate=opt.decay_factor)
    return optax.constant_schedule(lr)


def _warmup_cosine(opt: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
    """Warmup-cosine cycles, one per span between restarts (optimizer.restart_epochs)."""
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

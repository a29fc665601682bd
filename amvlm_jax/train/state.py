"""The train state shared by every job, and the learning-rate schedule."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Everything a jitted step reads and returns.

    params / batch_stats: the trained model's variables. opt_state: optax
    state of `tx`. ema: an exponential moving average of other variables
    (mean-teacher weights, momentum encoders), or None when the job has none.
    extra: job-specific trained variables with their own optimiser state (or None).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema: Any = None
    extra: Any = None
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, params, batch_stats, tx, ema=None, extra=None) -> "TrainState":
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            ema=ema,
            extra=extra,
            tx=tx,
        )

    def apply_gradients(self, grads, **changes) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)


def optimizer_telemetry(grads, params) -> dict:
    """Global L2 norms of a step's gradient and of the parameters after it (logged by every job)."""
    return {"grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params)}


def cosine_restarts(lr: float, min_lr: float, restart_epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """Cosine annealing from lr to min_lr over restart_epochs epochs, then restart.

    As the reference schedule, the rate changes once per epoch:
    lr_e = min_lr + (lr - min_lr) * (1 + cos(pi * (e mod T) / T)) / 2.
    """

    def schedule(step):
        epoch = step // steps_per_epoch
        phase = (epoch % restart_epochs) / restart_epochs
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * phase))

    return schedule

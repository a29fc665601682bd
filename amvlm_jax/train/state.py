"""The train state of each job, and the learning-rate schedule."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Everything a jitted step of the supervised job reads and returns; the other jobs' states add fields.

    params / batch_stats: the trained model's variables. opt_state: optax state of ``tx``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, params, batch_stats, tx, **fields):
        """The state at step 0; ``fields``: the subclass's own entries."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=tx.init(params),
                   tx=tx, **fields)

    def apply_gradients(self, grads, **changes):
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)


@struct.dataclass
class PretrainState(TrainState):
    """Pre-training: momentum = {'params', 'batch_stats'} of the momentum encoders (an EMA of the online
    encoders and their heads, SPEC 3.4), or None when ICL is off."""

    momentum: Any = None


@struct.dataclass
class MeanTeacherState(TrainState):
    """Mean-teacher SSMIS: the student in params / batch_stats, teacher = {'params', 'batch_stats'} (its
    EMA, SPEC 6), and generator = the text mask generator's trained variables ({'decoder', 'log_scale',
    'opt_state'} with the decoder's own Adam state, or {'head'}), None without text guidance."""

    teacher: Any = None
    generator: Any = None


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

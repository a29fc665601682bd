"""Device mesh and shardings."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from amvlm_jax.config import ConfigError


def make_mesh(config, devices=None) -> Mesh:
    """A 1-D mesh with axis 'data' over `config.mesh.data` devices (-1 = all)."""
    devices = jax.devices() if devices is None else devices
    count = len(devices) if config.mesh.data == -1 else config.mesh.data
    if count < 1 or count > len(devices):
        raise ConfigError(f"config.mesh.data={config.mesh.data} but {len(devices)} devices are available")
    if config.train.batch_size % count:
        raise ConfigError(f"config.train.batch_size={config.train.batch_size} is not divisible by the {count} data devices")
    return Mesh(np.asarray(devices[:count]), ("data",))


def replicate(mesh: Mesh, tree):
    """Places every leaf of `tree` on all devices of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))

"""Device mesh and the logical-axis → mesh-axis rules (multi-host start-up: ``core.distributed``).

Every parameter carries logical axis names (``Param(..., axes=("embed", "mlp"))``); one rules
table maps them onto the mesh axes ``('data', 'fsdp', 'tensor')``. ``TRAIN_RULES`` shards weights
over ``fsdp`` and ``tensor``; ``SERVE_RULES`` (sampling, labeling) keeps weights whole along
``fsdp`` so decode steps need no all-gathers.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, str | tuple[str, ...] | None]

TRAIN_RULES: Rules = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "patch": None,
    "channels": None,
    "positions": None,
    "seq": None,
}

SERVE_RULES: Rules = {**TRAIN_RULES, "embed": None}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh; one size may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                         f"have {len(devices)}")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def serve_mesh(tensor: int = 1) -> Mesh:
    """This process's own devices as a mesh for the inference stages (sampling, labeling, reference
    pass, evaluation): with ``SERVE_RULES`` weights are replicated over ``data`` (no per-token fsdp
    all-gathers) and split over ``tensor``; each host serves its own share of records alone."""
    return make_mesh(-1, 1, tensor, devices=jax.local_devices())


def _mesh_axes(name: str | None, rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules:
        raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules table")
    target = rules[name]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(axes: Sequence[str | None], rules: Rules = TRAIN_RULES,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
    """PartitionSpec for an array with logical ``axes``.

    Raises if two logical axes of one array map to the same mesh axis. With ``shape`` and ``mesh``,
    a dimension that the mesh axes do not divide is replicated instead (e.g. 2 KV heads on a
    4-way tensor axis).
    """
    used: dict[str, str] = {}
    spec = []
    for i, name in enumerate(axes):
        targets = _mesh_axes(name, rules)
        for t in targets:
            if t in used:
                raise ValueError(f"logical axes {used[t]!r} and {name!r} of one array both map to "
                                 f"mesh axis {t!r}")
            used[t] = name
        if shape is not None and mesh is not None and targets:
            size = math.prod(mesh.shape[t] for t in targets)
            if shape[i] % size:
                targets = ()
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*spec)


def state_shardings(state: Any, mesh: Mesh, rules: Rules = TRAIN_RULES) -> Any:
    """A pytree of ``NamedSharding`` matching an NNX state (abstract or concrete)."""

    def one(var):
        axes = getattr(var, "axes", None)
        value = var.get_value()
        if axes is None:
            axes = (None,) * len(value.shape)
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, rules, value.shape, mesh)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(model: nnx.Module, mesh: Mesh, rules: Rules = TRAIN_RULES) -> nnx.Module:
    """Place every variable of ``model`` on its sharding (in place) and return the model."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = TRAIN_RULES) -> NamedSharding:
    """Sharding for a batch-major array: the leading axis over the batch mesh axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


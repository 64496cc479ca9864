"""Logical axes -> mesh axes. Weights and the KV cache name their dimensions with logical axes
(zenjax/params.py); these rules map them onto a `jax.sharding.Mesh`, so tensor parallelism is a matter
of configuration: a mesh with a "tp" axis of size n shards heads and the MLP width n ways.

Example: wq has axes ("embed", "q_heads", "head_dim"); with RULES below and a mesh {"tp": 4} it gets
PartitionSpec(None, "tp", None): each device holds 28/4 = 7 of Qwen2.5-7B's query heads.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

RULES: dict[str, str | None] = {
    "vocab": None, "embed": None, "norm": None, "head_dim": None,
    "q_heads": "tp", "kv_heads": "tp", "mlp": "tp",
    "batch": None, "cache_seq": None,
    # Qwen2-MoE: the stacked expert weights [E, ...] name their expert axis "experts" (-> an "ep" mesh
    # axis once a mesh has one: expert parallelism), each expert's width "expert_mlp" (tensor parallel
    # like "mlp"); the router [D, E] is small and stays replicated.
    "experts": "ep", "expert_mlp": "tp", "router": None,
}


def make_mesh(tp: int = 1, devices=None) -> Mesh:
    """A 1-D tensor-parallel mesh over the first `tp` devices (default: one device)."""
    devices = devices if devices is not None else jax.devices()
    if tp > len(devices):
        raise ValueError(f"tensor_parallel={tp} exceeds the {len(devices)} available devices")
    return Mesh(np.asarray(devices[:tp]), ("tp",))


def spec_for(axes: tuple[str, ...], mesh: Mesh) -> P:
    names = []
    for a in axes:
        m = RULES.get(a)
        names.append(m if (m is not None and m in mesh.axis_names and mesh.shape[m] > 1) else None)
    return P(*names)


def sharding_for(axes: tuple[str, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(axes, mesh))


CACHE_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")   # KV cache [B, S, K, H]

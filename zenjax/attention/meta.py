"""AttentionMeta: everything an attention call needs besides q, k and v, as one pytree.

    q_start  [B] int32     absolute position of query row 0
    kv_len   [B] int32     valid keys after this step's write
    dca      DCAConfig | None                          static (part of the jit cache key)
    sparse   SparseLayer | None                        static: this layer's vertical-slash budgets
    indices  SparseIndices | None                      arrays: the selected columns and diagonals

Adding a field here (not another keyword to every implementation) is how the contract grows. The model
builds one per step and layer (`AttentionMeta.of_step`); the sparse module fills `indices` from the
budgets in `sparse` when they are missing (online estimation, spec 3.5).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from zenjax.config import DCAConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMeta:
    q_start: jax.Array
    kv_len: jax.Array
    dca: DCAConfig | None = dataclasses.field(default=None, metadata=dict(static=True))
    sparse: Any = dataclasses.field(default=None, metadata=dict(static=True))   # SparseLayer | None
    indices: Any = None                                                          # SparseIndices | None

    @staticmethod
    def of(q_start, kv_len, dca: DCAConfig | None = None, sparse=None, indices=None) -> "AttentionMeta":
        return AttentionMeta(jnp.asarray(q_start, jnp.int32), jnp.asarray(kv_len, jnp.int32), dca, sparse,
                             indices)

    def replace(self, **kw) -> "AttentionMeta":
        return dataclasses.replace(self, **kw)

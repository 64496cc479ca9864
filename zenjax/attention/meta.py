"""AttentionMeta: everything an attention call needs besides q, k and v, as one pytree.

    q_start  [B] int32     absolute position of query row 0
    kv_len   [B] int32     valid keys after this step's write
    dca      DCAConfig | None                          static (part of the jit cache key)
    sparse   SparseLayer | None                        static: this layer's vertical-slash budgets
    indices  SparseIndices | None                      arrays: the selected columns and diagonals
    kv_rows  [B] int32 | None  the cache row each query row reads (None: row b reads cache row b). Set,
             the caches may hold more rows than q (a server's [max_batch, S, K, H] cache and one
             prefilling slot): an implementation whose module has READS_KV_ROWS reads the rows itself,
             every other one gets `select_rows`' copy of them (the dispatcher makes it).

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
    kv_rows: Any = None                                                          # [B] int32 | None

    @staticmethod
    def of(q_start, kv_len, dca: DCAConfig | None = None, sparse=None, indices=None,
           kv_rows=None) -> "AttentionMeta":
        return AttentionMeta(jnp.asarray(q_start, jnp.int32), jnp.asarray(kv_len, jnp.int32), dca, sparse,
                             indices, None if kv_rows is None else jnp.asarray(kv_rows, jnp.int32))

    def replace(self, **kw) -> "AttentionMeta":
        return dataclasses.replace(self, **kw)


def select_rows(kv_rows, *bufs):
    """The rows kv_rows [B] of each cache buffer ([R, S, ...] -> [B, S, ...]; None stays None), as a copy.
    One row (a prefilling slot) is a dynamic slice, which a kernel call is expected to get as a new
    buffer (a copy; zenjax/attention/pallas.py READS_KV_ROWS), which is why kernels that can index the
    cache themselves take kv_rows instead."""
    def pick(buf):
        if buf is None:
            return None
        if kv_rows.shape == (1,):
            return jax.lax.dynamic_slice_in_dim(buf, kv_rows[0], 1, axis=0)
        return jnp.take(buf, kv_rows, axis=0)
    return tuple(pick(b) for b in bufs)

"""Qwen2-MoE's sparse MLP (spec shared/spec/long-context.md 1.2) as pure functions.

Flow of `moe_mlp` for the M = B*T tokens h [M, D] of one step (E experts, top k, expert width F):
  1. route: router logits h @ router [M, E] accumulated in float32, softmax over all E in float32,
     top-k -> weights [M, k] and expert ids [M, k]; with norm_topk_prob the k weights are divided by
     their sum (Qwen1.5-MoE-A2.7B: off, so they sum to less than 1); then cast to h's dtype, as HF does.
  2. the M*k (token, expert) assignments are sorted by expert (a stable argsort of the ids), each row
     gathers its token's h -> xs [M*k, D], and group_sizes [E] counts the rows of each expert;
  3. grouped SwiGLU: ragged_dot(xs, experts_w_gate [E, D, F]) etc. -> ys [M*k, D]: every row is
     multiplied by its own expert's weights only;
  4. each row times its routing weight, rows put back in token order ([M, k, D]) and summed over k;
  5. plus the shared expert, gated per token by sigmoid(h @ shared_gate) (a scalar per token).
Worked example: M = 2, k = 2, ids [[3, 0], [0, 2]] -> sorted assignments (t0,e0) (t1,e0) (t1,e2) (t0,e3),
group_sizes [2, 0, 1, 1]: expert 0 multiplies rows 0-1, expert 2 row 2, expert 3 row 3.

Why jax.lax.ragged_dot rather than a dense einsum over all experts: the dense form multiplies every
token by every expert (E/k = 15x the FLOPs for A2.7B's 60 experts, top-4) and materialises [M, E, F]
(32K tokens x 60 x 1408 x 2 bytes = 5.5 GB per projection); ragged_dot does only the routed work with
static shapes ([M*k, D] whatever the routing), so one compiled step serves every routing, and it is
the op XLA lowers to a grouped GEMM on GPU (the Mosaic GPU grouped matmul in JAX's Pallas ops has the
same contract, group sizes over sorted rows, should it be needed). Padding rows of a prefill chunk are
routed like any token (static shapes); their outputs are never written to the cache.

Expert parallelism (`sharded_routed_experts`, a mesh with an "ep" axis, zenjax/sharding.py): every device
holds E/ep experts (and, with tensor parallelism, a slice of each one's width), routes every token (the
router is replicated, so all devices agree), runs steps 2-4 for the assignments to its own experts only
(the others sort past sum(group_sizes), where ragged_dot returns zero rows) and one psum over the split
axes adds the devices' partial sums. Simple and exact; it moves no tokens (no all-to-all), at the cost of
each device sorting all M*k assignments.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from zenjax.config import MoEConfig
from zenjax.fp8 import Fp8Weight
from zenjax.layers import grouped_linear, linear, swiglu


def route(h, router, k: int, norm_topk_prob: bool):
    """h [M, D], router [D, E] -> (weights [M, k] in h's dtype, expert ids [M, k] int32), best first."""
    logits = linear("md,de->me", h, router, out_dtype=jnp.float32)
    prob = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(prob, k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(h.dtype), experts.astype(jnp.int32)


def _num_experts(w) -> int:
    """E of a stacked expert weight (float or fp8)."""
    return (w.values if hasattr(w, "values") else w).shape[0]


def routed_experts(h, weights, experts, w_gate, w_up, w_down, first_expert=0, gather=None):
    """sum_j weights[m, j] * SwiGLU_{experts[m, j]}(h[m]) for h [M, D]; expert weights [E, D, F],
    [E, D, F], [E, F, D]. Steps 2-4 of the module docstring.

    first_expert: the weights hold experts [first_expert, first_expert + E) of the model (one device's
    share under expert parallelism); assignments to other experts contribute nothing: they sort after
    the local ones, past sum(group_sizes), where ragged_dot leaves zero rows.
    gather: multiply each assignment by its own expert's gathered weights instead of the grouped matmul
    (`_gathered_experts`); None: where M*k <= E, i.e. at decode size (see there)."""
    M, D = h.shape
    k, E = experts.shape[1], _num_experts(w_gate)
    flat = experts.reshape(-1) - first_expert                         # [M*k] assignment -> local expert
    local = (flat >= 0) & (flat < E)
    if gather is None:
        gather = M * k <= E
    if gather:
        return _gathered_experts(h, jnp.where(local, weights.reshape(-1), 0), jnp.where(local, flat, 0),
                                 w_gate, w_up, w_down).reshape(M, k, D).sum(axis=1)
    flat = jnp.where(local, flat, E)                                  # others: the empty group E, sorted last
    order = jnp.argsort(flat, stable=True)                            # assignments sorted by expert
    xs = jnp.take(h, order // k, axis=0)                              # [M*k, D] each row's token
    sizes = jnp.bincount(flat, length=E + 1)[:E].astype(jnp.int32)    # [E] rows per local expert
    row_e = jnp.minimum(jnp.take(flat, order), E - 1)                 # [M*k] each sorted row's expert
    gate = grouped_linear(xs, w_gate, sizes, row_e)
    up = grouped_linear(xs, w_up, sizes, row_e)
    ys = grouped_linear(jax.nn.silu(gate) * up, w_down, sizes, row_e)  # [M*k, D]
    ys = ys * jnp.take(jnp.where(local, weights.reshape(-1), 0), order)[:, None]
    unsort = jnp.zeros_like(order).at[order].set(jnp.arange(M * k, dtype=order.dtype))
    return jnp.take(ys, unsort, axis=0).reshape(M, k, D).sum(axis=1)  # back in token order


def _gathered_experts(h, row_weight, row_expert, w_gate, w_up, w_down):
    """Decode-sized routed experts: assignment r (token r // k) gathers its expert's three matrices and
    multiplies its token by them -> [M*k, D], each row times row_weight[r] (0 for other devices' experts).

    Why: on the GPU the grouped matmul reads every expert's weights whatever the routing (A2.7B: 60 x 3 x
    2048 x 1408 bf16 = 1 GB per layer, ~25 GB a decode step), while a step of one token needs only its
    k = 4 experts (69 MB per layer). Gathering reads only the routed experts, so it wins while the M*k
    assignments are at most E (batch <= 15 for A2.7B); the gathered copy costs a write and a read of those
    experts' bytes, and a repeated expert is read once per assignment."""
    k = row_expert.shape[0] // h.shape[0]
    xs = jnp.repeat(h, k, axis=0)                                     # [M*k, D] each assignment's token

    def proj(x, w):
        if isinstance(w, Fp8Weight):
            y = jnp.einsum("ri,roi->ro", x, jnp.take(w.values, row_expert, axis=0).astype(x.dtype))  # out-major
            return (y * jnp.take(w.scale, row_expert, axis=0)).astype(y.dtype)
        return jnp.einsum("ri,rio->ro", x, jnp.take(w, row_expert, axis=0))
    ys = proj(jax.nn.silu(proj(xs, w_gate)) * proj(xs, w_up), w_down)
    return ys * row_weight.astype(ys.dtype)[:, None]


EXPERT_WEIGHTS = ("experts_w_gate", "experts_w_up", "experts_w_down")


def sharded_routed_experts(x, weights, experts, w: dict, axes: dict, mesh):
    """routed_experts with the expert weights split over the mesh (zenjax/sharding.py: experts over "ep",
    each expert's width over ("tp", "kvr")): every device runs its experts' share of every token (tokens
    and routing are replicated), then one psum over the axes the weights are split on adds the partial
    sums (other experts' tokens contribute zero; a width shard gives a partial down projection).
    axes: {name: logical axes} of the layer's parameters (zenjax/params.py), fp8 scales included."""
    from jax.sharding import PartitionSpec as P
    from zenjax.fp8 import Fp8Weight
    from zenjax.sharding import mesh_size, spec_axes, spec_for

    def spec(name):
        s = spec_for(axes[name], mesh)
        return Fp8Weight(s, spec_for(axes[name + "_scale"], mesh)) if isinstance(w[name], Fp8Weight) else s

    specs = [spec(n) for n in EXPERT_WEIGHTS]
    split = spec_axes(spec_for(axes["experts_w_gate"], mesh))            # gate/up/down: same mesh axes
    e_local = _num_experts(w["experts_w_gate"]) // mesh_size(mesh, ("ep",))

    def local(x, weights, experts, *ws):
        first = jax.lax.axis_index("ep") * e_local if "ep" in split else 0
        y = routed_experts(x, weights, experts, *ws, first_expert=first)
        return jax.lax.psum(y, split) if split else y

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), *specs), out_specs=P(), check_vma=False)
    return fn(x, weights, experts, *(w[n] for n in EXPERT_WEIGHTS))


def moe_mlp(w: dict, h, moe: MoEConfig, mesh=None, axes: dict | None = None):
    """A sparse layer's MLP: h [B, T, D] -> [B, T, D]; w holds the layer's router, experts_w_* and
    shared_* weights (zenjax/params.py). mesh (several devices) + axes (logical axes per weight name):
    the routed experts run per device on its share (sharded_routed_experts); the shared expert and the
    router are left to XLA's sharding propagation (dense matmuls with split widths)."""
    B, T, D = h.shape
    x = h.reshape(B * T, D)
    weights, experts = route(x, w["router"], moe.num_experts_per_tok, moe.norm_topk_prob)
    if mesh is not None and mesh.size > 1:
        y = sharded_routed_experts(x, weights, experts, w, axes, mesh)
    else:
        y = routed_experts(x, weights, experts, w["experts_w_gate"], w["experts_w_up"], w["experts_w_down"])
    shared = swiglu(x, w["shared_w_gate"], w["shared_w_up"], w["shared_w_down"])
    gate = jax.nn.sigmoid(linear("md,d->m", x, w["shared_gate"]))     # [M] one scalar per token
    return (y + gate[:, None] * shared).reshape(B, T, D)

"""Qwen2 / Qwen2.5 (and Qwen2-MoE) decoder in Flax NNX, and its KV cache.

Dimension alphabet, used in every einsum, shape comment and name in zenjax:
    B  batch (decode slots)      T  queries (tokens of this step)   S  keys (KV cache slots)
    D  model width               N  query heads                     K  kv heads
    G  group = N / K             H  head dim                        F  MLP width     V  vocab
    E  experts (Qwen2-MoE)

One step of the model (prefill chunk or decode) for the tokens [B, T] at absolute positions
q_start + [0, T):
    x = embed[tokens]                                            [B, T, D]
    per layer:  h = rms(x);  q, k, v = h @ w_qkv + b_qkv, split   [B, T, N|K, H]   (zenjax/layers.py)
                rotate (plain RoPE by position; DCA: k by j mod s, q three ways; temperature m on q, k)
                write k, v into the cache at their positions (positions >= S are dropped: padding)
                a = attention(q, cache, impl)  -> x += a @ wo;   x += mlp(rms(x))
                mlp: dense SwiGLU, or on Qwen2-MoE's sparse layers routed experts + shared expert
                (zenjax/moe.py)
    logits only for the rows asked for (never a [T, V] array for a long prompt while serving)

The weights are nnx.Params whose metadata `logical_axes` comes from zenjax/params.py; the cache is a
pytree of one [B, S, K, H] array per layer for k and for v, donated to every jitted step so XLA updates
it in place. Layers are unrolled (not scanned) so each layer's cache is its own buffer that attention
reads without a copy.
"""
from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from zenjax import attention as attn_lib
from zenjax.config import ModelConfig
from zenjax.fp8 import Fp8Weight
from zenjax.layers import dense_mlp, linear, output_projection, qkv_projection
from zenjax.moe import moe_mlp
from zenjax.params import layer_param_specs, param_specs, scale_name
from zenjax.rope import apply_rope
from zenjax.sharding import ACT_AXES, check_mesh, constrain, is_sharded


FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0       # largest finite e4m3fn value


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """One [B, S, K, H] buffer per layer for k and v. With an fp8 (e4m3) cache, each (token, kv head)
    vector also has a float32 scale in k_scale / v_scale [B, S, K]: x ~= x8 * scale with
    scale = max|x| / 448, so every head of every token uses the full e4m3 range. Example: a key head
    whose largest component is 3.5 gets scale 3.5/448 and is stored as values up to 448."""

    k: list
    v: list
    k_scale: list | None = None
    v_scale: list | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def layer(self, l: int) -> tuple:
        """Layer l's buffers (k, v, k_scale, v_scale); the scales are None for a float cache."""
        if not self.quantized:
            return self.k[l], self.v[l], None, None
        return self.k[l], self.v[l], self.k_scale[l], self.v_scale[l]

    @staticmethod
    def from_layers(bufs: list, quantized: bool) -> "KVCache":
        """The inverse of `layer` over all layers."""
        k, v, ks, vs = (list(b) for b in zip(*bufs))
        return KVCache(k, v, ks, vs) if quantized else KVCache(k, v)

    @staticmethod
    def zeros(cfg: ModelConfig, batch: int, max_len: int, dtype, sharding=None) -> "KVCache":
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)

        def make(shape, dtype):
            if sharding is None:
                return jnp.zeros(shape, dtype)
            spec = jax.sharding.PartitionSpec(*tuple(sharding.spec)[: len(shape)])
            return jax.jit(lambda: jnp.zeros(shape, dtype),
                           out_shardings=jax.sharding.NamedSharding(sharding.mesh, spec))()

        L = cfg.num_layers
        k = [make(shape, dtype) for _ in range(L)]
        v = [make(shape, dtype) for _ in range(L)]
        if jnp.dtype(dtype) != FP8:
            return KVCache(k, v)
        return KVCache(k, v, [make(shape[:3], jnp.float32) for _ in range(L)],
                       [make(shape[:3], jnp.float32) for _ in range(L)])

    @staticmethod
    def nbytes(cfg: ModelConfig, batch: int, max_len: int, dtype) -> int:
        per_token_head = cfg.head_dim * jnp.dtype(dtype).itemsize + (4 if jnp.dtype(dtype) == FP8 else 0)
        return 2 * cfg.num_layers * batch * max_len * cfg.num_kv_heads * per_token_head


def quantize_fp8(x):
    """[..., H] -> (e4m3 values [..., H], float32 scales [...])."""
    xf = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1), 1e-12) / FP8_MAX
    return (xf / scale[..., None]).astype(FP8), scale


def dequantize_fp8(x8, scale, dtype):
    return (x8.astype(jnp.float32) * scale[..., None]).astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    """What one jitted step needs besides weights and cache. Shapes for a step of B rows x T tokens."""

    tokens: jax.Array       # [B, T] int32
    q_start: jax.Array      # [B] int32   absolute position of row 0
    kv_len: jax.Array       # [B] int32   valid keys after this step (q_start + valid tokens)
    write_pos: jax.Array    # [B, T] int32 cache slot of each token; >= S for padding (dropped)
    temp: jax.Array         # [B] f32     DCA temperature m(L) (1.0 when off), spec 2.6


def rms_norm(x, w, eps: float):
    """HF Qwen2RMSNorm: fp32 statistics, cast back to x's dtype, then times the weight."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * y.astype(x.dtype)


class Block(nnx.Module):
    """One decoder layer's weights (names and shapes: zenjax/params.py; a Qwen2-MoE sparse layer has
    router / experts_w_* / shared_* where a dense layer has w_gate_up / w_down)."""

    def __init__(self, cfg: ModelConfig, l: int, arrays: dict):
        specs = layer_param_specs(cfg, l, quantization_of(arrays))
        for name, spec in specs.items():
            setattr(self, name, nnx.Param(arrays[name], logical_axes=spec.axes))
        self.quantization = quantization_of(arrays)                    # static: None | "fp8"

    def axes(self, cfg: ModelConfig, l: int) -> dict:
        """{name: logical axes} of this layer's parameters (fp8 scales included), for the sharded MoE."""
        return {name: spec.axes for name, spec in layer_param_specs(cfg, l, self.quantization).items()}

    def weights(self, cfg: ModelConfig, l: int) -> dict:
        """{name: array or Fp8Weight} for the pure layer functions (zenjax/layers.py, zenjax/moe.py)."""
        names = layer_param_specs(cfg, l)
        return {name: (Fp8Weight(getattr(self, name)[...], getattr(self, scale_name(name))[...])
                       if hasattr(self, scale_name(name)) else getattr(self, name)[...]) for name in names}


def quantization_of(arrays: dict) -> str | None:
    """A layer's weight format, read off its arrays: fp8 when they carry scales (zenjax/params.py)."""
    return "fp8" if any(k.endswith("_scale") for k in arrays) else None


class Qwen2(nnx.Module):
    def __init__(self, cfg: ModelConfig, params: dict, mesh=None):
        """params: nested dict laid out as zenjax/params.py (layers keyed "0", "1", ...), placed on `mesh`
        (zenjax/sharding.py) when given: attention then runs per device on its heads (shard_map), routed
        experts per device on its experts, and activations are pinned replicated at layer boundaries."""
        check_mesh(cfg, mesh)
        specs = param_specs(cfg)
        self.cfg = cfg
        self.mesh = mesh if is_sharded(mesh) else None        # static (part of the graphdef)
        self.embed = nnx.Param(params["embed"], logical_axes=specs[("embed",)].axes)
        self.layers = nnx.List([Block(cfg, l, params["layers"][str(l)]) for l in range(cfg.num_layers)])
        self.final_norm = nnx.Param(params["final_norm"], logical_axes=specs[("final_norm",)].axes)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(params["lm_head"], logical_axes=specs[("lm_head",)].axes)

    def head_weight(self):
        return self.embed[...] if self.cfg.tie_word_embeddings else self.lm_head[...]

    def _rotate(self, q, k, positions, temp):
        """Plain RoPE: q [B,T,N,H], k [B,T,K,H] by absolute positions. DCA: k by j mod s and q three
        ways -> q [3,B,T,N,H]; both scaled by the temperature m (spec 2.6).

        Decode-time key scaling: we follow vLLM, which scales the new key by m(current length) BEFORE
        writing it to the cache (so a logit is m(L_now) * m(L_at_write) * q.k / sqrt(H)). SGLang's port
        caches decode keys unscaled. vLLM's backend is the code Qwen shipped with Qwen2.5-1M, so reference
        outputs are pinned to it. The engine passes m per sequence in `temp` (1.0 without DCA).
        Example: a 1M-token prompt (L0 = 262144) gives m = 1.1339 for every prefill chunk."""
        cfg = self.cfg
        if cfg.dca is None:
            return apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
        from zenjax.dca import rotate_for_dca
        q3, k = rotate_for_dca(q, k, positions, positions, cfg.dca, cfg.rope_theta)
        m = temp[:, None, None, None].astype(q.dtype)
        return q3 * m, k * m

    def __call__(self, inp: StepInputs, cache: KVCache, *, impl: str, slot=None, logits_rows=None,
                 sparse=None, recall_probe=None, writes_in_bounds: bool = False):
        """Run one step. slot=None: rows are the cache's batch rows (decode). slot=i (traced int):
        the single row of `inp` is cache row i (prefill of one slot among several).

        logits_rows: None -> logits for every token [B, T, V] (short inputs only); an int array [B] ->
        logits of that row of each sequence [B, V]. Returns (logits float32, new cache).
        sparse: a SparseConfig for a sparse prefill step (zenjax/attention/sparse.py), else None (dense).
        recall_probe: (SparseConfig, list) for the refinement tool (zenjax/refine): attention stays dense,
        and each layer also runs the dispatcher's sparse path with the probe's budgets on the same q/k/v and
        appends its log recall lse_sparse - lse_dense [B, T, N] to the list (spec 3.6).
        writes_in_bounds: every write_pos is < S (the decode step's promise; no padding row to drop), so the
        cache write can be a plain dynamic-update-slice (see _write).
        """
        (logits,), cache = self.step([Rows(inp, slot, logits_rows, sparse, writes_in_bounds)], cache, impl=impl,
                                     recall_probe=recall_probe)
        return logits, cache

    def step(self, groups: list, cache: KVCache, *, impl: str, recall_probe=None):
        """Run one step over one or more row groups (`Rows`) that share this step's weight reads: e.g. a
        prefill piece of one slot [1, T] and a decode step of every slot [B, 1] (runner's prefill_decode).
        Each group is rotated, written into the cache and attended with its own inputs; the matmuls run
        once over all rows, concatenated as [1, R, D] with R = sum of B_g * T_g (one group keeps its
        [B, T, D]). Every group's writes land before any group reads, so the groups' writes must not
        overlap what the others read (the runner's decode rows write at each slot's first free position,
        the prefill piece below its slot's). Returns ([logits per group], new cache)."""
        cfg, mesh = self.cfg, self.mesh
        shapes = [g.inp.tokens.shape for g in groups]
        if len(groups) > 1 and (recall_probe is not None or any(g.logits_rows is None for g in groups)):
            raise ValueError("recall_probe and all-row logits run on a single row group")

        def join(parts):             # per group [B_g, T_g, ...] -> [B, T, ...] (one group) or [1, R, ...]
            if len(parts) == 1:
                return parts[0]
            return jnp.concatenate([p.reshape((1, -1) + p.shape[2:]) for p in parts], axis=1)

        def split(y):                # the inverse of join
            if len(shapes) == 1:
                return [y]
            out, o = [], 0
            for B, T in shapes:
                out.append(y[:, o:o + B * T].reshape((B, T) + y.shape[2:]))
                o += B * T
            return out

        positions = [g.inp.q_start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :] for g, (_, T) in
                     zip(groups, shapes)]                                                        # [B, T] each
        x = constrain(join([jnp.take(self.embed[...], g.inp.tokens, axis=0) for g in groups]), mesh, ACT_AXES)
        new_bufs = []
        for l, blk in enumerate(self.layers):
            w = blk.weights(cfg, l)
            h = rms_norm(x, blk.attn_norm[...], cfg.rms_norm_eps)
            qkv = [split(y) for y in qkv_projection(w, h)]
            bufs = cache.layer(l)
            rotated = []
            for i, g in enumerate(groups):
                # heads split as attention reads them (q over ("tp", "kvr"), k / v over "tp": the cache's layout)
                q = constrain(qkv[0][i], mesh, ("batch", None, "q_heads", "head_dim"))
                k = constrain(qkv[1][i], mesh, ("batch", None, "kv_heads", "head_dim"))
                v = constrain(qkv[2][i], mesh, ("batch", None, "kv_heads", "head_dim"))
                q, k = self._rotate(q, k, positions[i], g.inp.temp)
                bufs = self._write(bufs, g, k, v)
                rotated.append(q)
            outs = []
            for g, q, (B, _) in zip(groups, rotated, shapes):
                k_read, v_read, ks_read, vs_read = bufs
                # a prefilling slot's row is named, not sliced: a kernel reads it in place (meta.kv_rows)
                rows = None if g.slot is None else jnp.full((B,), g.slot, jnp.int32)
                meta = attn_lib.AttentionMeta(g.inp.q_start, g.inp.kv_len, cfg.dca,
                                              None if g.sparse is None else g.sparse.layer(l, cfg.rope_theta),
                                              kv_rows=rows)
                a, lse = attn_lib.attention_lse(q, k_read, v_read, meta, impl=impl, k_scale=ks_read,
                                                v_scale=vs_read, mesh=mesh)
                if recall_probe is not None:
                    probe, log_recall = recall_probe
                    pmeta = meta.replace(sparse=probe.layer(l, cfg.rope_theta))
                    _, lse_sparse = attn_lib.attention_lse(q, k_read, v_read, pmeta, impl=impl, k_scale=ks_read,
                                                           v_scale=vs_read, mesh=mesh)
                    log_recall.append(lse_sparse - lse)
                outs.append(a.astype(x.dtype))
            new_bufs.append(bufs)
            x = constrain(x + output_projection(w, join(outs)), mesh, ACT_AXES)
            h = rms_norm(x, blk.mlp_norm[...], cfg.rms_norm_eps)
            x = x + (moe_mlp(w, h, cfg.moe, mesh, blk.axes(cfg, l)) if cfg.is_moe_layer(l) else dense_mlp(w, h))
            x = constrain(x, mesh, ACT_AXES)
        cache = KVCache.from_layers(new_bufs, cache.quantized)
        if len(groups) == 1 and groups[0].logits_rows is None:    # every row's logits [B, T, V] (short inputs)
            return [self._logits(x)], cache
        # one head product for every group's rows: [sum B_g, V], then cut per group
        rows = [jnp.take_along_axis(xg, g.logits_rows[:, None, None], axis=1)[:, 0] for g, xg in zip(groups, split(x))]
        logits = self._logits(jnp.concatenate(rows, axis=0) if len(rows) > 1 else rows[0])
        cuts = list(itertools.accumulate(B for B, _ in shapes))[:-1]
        return (jnp.split(logits, cuts, axis=0) if cuts else [logits]), cache

    def _logits(self, x):
        x = rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)
        return linear("...d,vd->...v", x, self.head_weight()).astype(jnp.float32)

    @staticmethod
    def _write(bufs, g: "Rows", k, v):
        """Scatter one group's k, v into a layer's cache buffers (k, v, k_scale, v_scale; the scales None
        for a float cache) in place (the cache is donated); an fp8 cache gets e4m3 values and their scales.

        Why a separate in-bounds path: a scatter that drops out-of-range rows becomes, for one row, a
        dynamic-update-slice guarded by a select that re-reads the cache, and XLA then cannot fuse the
        key's rotation into the in-place write (H100 HLO of the batch-1 decode step: 4 kernels per layer
        for the k and v writes; a plain dynamic-update-slice takes the rotation as its update: 2)."""
        B = k.shape[0]
        rows = jnp.arange(B)[:, None] if g.slot is None else jnp.full((B, 1), g.slot)
        write_pos = g.inp.write_pos

        def put(buf, val):
            val = val.astype(buf.dtype)
            if g.in_bounds and write_pos.shape == (1, 1):
                start = (rows[0, 0], write_pos[0, 0]) + (jnp.int32(0),) * (buf.ndim - 2)
                return jax.lax.dynamic_update_slice(buf, val, start)
            return buf.at[rows, write_pos].set(val, mode="promise_in_bounds" if g.in_bounds else "drop")

        k_buf, v_buf, ks_buf, vs_buf = bufs
        if ks_buf is None:
            return put(k_buf, k), put(v_buf, v), None, None
        (k8, ks), (v8, vs) = quantize_fp8(k), quantize_fp8(v)
        return put(k_buf, k8), put(v_buf, v8), put(ks_buf, ks), put(vs_buf, vs)


@dataclasses.dataclass(frozen=True)
class Rows:
    """One group of rows of a step (Qwen2.step): its inputs, which cache rows they are (slot None: the
    cache's batch rows in order; a traced int: the single row is that cache row), the rows whose logits
    are returned (None: all, [B, T, V]; an int array [B]: one per row, [B, V]), the sparse budgets of a
    sparse prefill piece, and whether every write_pos is < S (see Qwen2._write)."""

    inp: StepInputs
    slot: object = None
    logits_rows: object = None
    sparse: object = None
    in_bounds: bool = False


def init_params(cfg: ModelConfig, key, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random weights laid out as zenjax/params.py (norms at 1, biases small)."""
    from zenjax.params import nested_set
    params: dict = {}
    specs = param_specs(cfg)
    keys = jax.random.split(key, len(specs))
    for k, (path, spec) in zip(keys, specs.items()):
        if path[-1].endswith("norm"):
            value = jnp.ones(spec.shape, dtype)
        else:
            value = (jax.random.normal(k, spec.shape, jnp.float32) * scale).astype(dtype)
        nested_set(params, path, value)
    return params

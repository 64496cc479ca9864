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
        cache write can be a plain dynamic-update-slice (see _write_and_read).
        """
        cfg = self.cfg
        B, T = inp.tokens.shape
        positions = inp.q_start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]   # [B, T]
        mesh = self.mesh
        x = constrain(jnp.take(self.embed[...], inp.tokens, axis=0), mesh, ACT_AXES)  # [B, T, D]
        new_k, new_v, new_ks, new_vs = [], [], [], []
        for l, blk in enumerate(self.layers):
            w = blk.weights(cfg, l)
            h = rms_norm(x, blk.attn_norm[...], cfg.rms_norm_eps)
            q, k, v = qkv_projection(w, h)
            # heads split as attention reads them (q over ("tp", "kvr"), k / v over "tp": the cache's layout)
            q = constrain(q, mesh, ("batch", None, "q_heads", "head_dim"))
            k = constrain(k, mesh, ("batch", None, "kv_heads", "head_dim"))
            v = constrain(v, mesh, ("batch", None, "kv_heads", "head_dim"))
            q, k = self._rotate(q, k, positions, inp.temp)
            rows = jnp.arange(B)[:, None] if slot is None else jnp.full((B, 1), slot)
            k_read, v_read, ks_read, vs_read = self._write_and_read(cache, l, rows, inp.write_pos, k, v, slot, B,
                                                                    new_k, new_v, new_ks, new_vs, writes_in_bounds)
            meta = attn_lib.AttentionMeta(inp.q_start, inp.kv_len, cfg.dca,
                                          None if sparse is None else sparse.layer(l, cfg.rope_theta))
            a, lse = attn_lib.attention_lse(q, k_read, v_read, meta, impl=impl, k_scale=ks_read, v_scale=vs_read,
                                            mesh=mesh)
            if recall_probe is not None:
                probe, log_recall = recall_probe
                pmeta = meta.replace(sparse=probe.layer(l, cfg.rope_theta))
                _, lse_sparse = attn_lib.attention_lse(q, k_read, v_read, pmeta, impl=impl, k_scale=ks_read,
                                                       v_scale=vs_read, mesh=mesh)
                log_recall.append(lse_sparse - lse)
            x = constrain(x + output_projection(w, a.astype(x.dtype)), mesh, ACT_AXES)
            h = rms_norm(x, blk.mlp_norm[...], cfg.rms_norm_eps)
            x = x + (moe_mlp(w, h, cfg.moe, mesh, blk.axes(cfg, l)) if cfg.is_moe_layer(l) else dense_mlp(w, h))
            x = constrain(x, mesh, ACT_AXES)
        if logits_rows is not None:
            x = jnp.take_along_axis(x, logits_rows[:, None, None], axis=1)[:, 0]        # [B, D]
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        logits = linear("...d,vd->...v", x, self.head_weight()).astype(jnp.float32)
        scales = (new_ks, new_vs) if cache.quantized else (None, None)
        return logits, KVCache(new_k, new_v, *scales)

    @staticmethod
    def _write_and_read(cache, l, rows, write_pos, k, v, slot, B, new_k, new_v, new_ks, new_vs, in_bounds):
        """Scatter this step's k, v into layer l's cache (in place: the cache is donated) and return
        what attention reads: the whole cache (decode) or the prefilling slot's row, as (k, v, k_scale,
        v_scale); an fp8 cache is returned as e4m3 values with their scales (the Pallas decode kernel reads
        them directly; the dispatcher dequantizes for the other paths), a bf16 one with scales None.

        Why a separate in-bounds path: a scatter that drops out-of-range rows becomes, for one row, a
        dynamic-update-slice guarded by a select that re-reads the cache, and XLA then cannot fuse the
        key's rotation into the in-place write (H100 HLO of the batch-1 decode step: 4 kernels per layer
        for the k and v writes; a plain dynamic-update-slice takes the rotation as its update: 2)."""
        def put(buf, val):
            val = val.astype(buf.dtype)
            if in_bounds and write_pos.shape == (1, 1):
                start = (rows[0, 0], write_pos[0, 0]) + (jnp.int32(0),) * (buf.ndim - 2)
                return jax.lax.dynamic_update_slice(buf, val, start)
            return buf.at[rows, write_pos].set(val, mode="promise_in_bounds" if in_bounds else "drop")

        def row(buf):
            return buf if slot is None else jax.lax.dynamic_slice_in_dim(buf, slot, B, axis=0)

        if not cache.quantized:
            k_cache, v_cache = put(cache.k[l], k), put(cache.v[l], v)
            new_k.append(k_cache)
            new_v.append(v_cache)
            return row(k_cache), row(v_cache), None, None
        (k8, ks), (v8, vs) = quantize_fp8(k), quantize_fp8(v)
        bufs = [put(cache.k[l], k8), put(cache.v[l], v8), put(cache.k_scale[l], ks), put(cache.v_scale[l], vs)]
        for lst, b in zip((new_k, new_v, new_ks, new_vs), bufs):
            lst.append(b)
        return row(bufs[0]), row(bufs[1]), row(bufs[2]), row(bufs[3])


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

"""Attention through cuDNN flash attention: plain RoPE and Dual Chunk Attention, merged by log-sum-exp.

Contract: zenjax/attention/__init__.py (shapes, semantics); this module equals `reference_attention_lse` there.

The walk. Every step is split into "partials": one cuDNN call each, over a contiguous key range with one
query variant and a mask cuDNN has natively (none, causal, or "keys < seqlen"). Each partial returns its
normalized output o_i and row log-sum-exp lse_i; `_merge` combines them (spec 2.4). No [T, S] mask is
ever built, so S can be 1M.

  plain prefill chunk, queries at [q_start, q_start + T):
      prefix : q vs keys [0, q_start)            non-causal, whole cache, kv seqlen = q_start
      own    : q vs keys [q_start, q_start + T)  causal, a [T, T] window gathered at q_start. A square
               causal mask is alignment-safe: row t sees window rows <= t, i.e. keys <= q_start + t.
  plain decode (T = 1):  q vs keys [0, q_start] with kv seqlen = min(q_start + 1, kv_len).

  DCA prefill chunk; n = q_start // s is the DCA chunk of every valid query (see ASSUMPTION):
      intra-prefix : q_intra vs keys [n*s, q_start)       window of min(s, S) keys at n*s, seqlen q_start - n*s
      own          : q_intra vs keys [q_start, q_start+T) causal [T, T] window, as in plain
      succ         : q_succ  vs keys [(n-1)*s, n*s)       window of s keys, present when n >= 1
      inter        : q_inter vs keys [0, (n-1)*s)         whole cache, seqlen (n-1)*s, present when n >= 2
  DCA decode (spec 2.5): intra = keys [n*s, q_start] in one partial; succ and inter as above.

  Example: s = 48, a prefill chunk at q_start = 100 with T = 30 (n = 2): intra-prefix keys [96, 100),
  own keys [100, 130) causal, succ keys [48, 96) with q_succ, inter keys [0, 48) with q_inter.

ASSUMPTION (DCA prefill under jit): all valid query rows of a step lie in ONE DCA chunk. The engine
splits prompts at multiples of s so this holds. With traced q_start/kv_len it cannot be checked cheaply;
a violating step would silently attend with the wrong query variants. With concrete (non-traced)
q_start/kv_len (eager calls, benchmarks passing constants, a whole prompt at q_start = 0) a crossing step
is cut at the boundaries into per-chunk steps, as vLLM's prefill loop does (spec 2.3), and absent
partials are skipped statically. Padding rows (beyond kv_len) may cross a boundary: they are ignored.

Absent partials (q_start = 0 for the prefix, n < 1 for succ, n < 2 for inter) still run (shapes are
static) with seqlen clamped to >= 1, and are removed in the merge by lse = -inf and o = 0, so an empty key
range can never inject a NaN. Static sizes skip what cannot exist: no succ partial when S <= s, no inter
when S <= 2s.

Cost note: DCA windows are gathered copies (cuDNN masks only from above: seqlen, causal). For prefill they
are small next to the FLOPs (a window of s = 253952 keys is ~0.5 GB for K+V in bf16, < 1 ms of HBM time per
layer). For DCA decode at 1M context the intra and succ copies roughly double the bytes moved; the Pallas
decode kernel is the fast path there.

LSE precision: `jax.nn.dot_product_attention(..., return_residual=True)` casts cuDNN's fp32 softmax
statistics to the output dtype, i.e. bf16 for bf16 inputs. bf16 keeps 8 significant bits, so an lse of
~10 is off by up to ~0.03 and merge weights by up to ~3%, which the merged output inherits
(tests/test_attention_cudnn.py::test_bf16_lse_cost measures it). The default implementation therefore
calls the cuDNN primitive underneath (`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`)
that returns the statistics in fp32, and falls back to the public API (bf16 lse) if that private module
ever moves. `_implementation="cudnn_public"` forces the public API (for benchmarks/check_cudnn.py), and
`_implementation="xla"` runs the identical decomposition with XLA's attention so CPU tests exercise it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zenjax.attention.reference import reference_attention_lse
from zenjax.config import DCAConfig

_IMPLEMENTATIONS = ("cudnn", "cudnn_public", "xla")


def _reference(q, k_cache, v_cache, *, q_start, kv_len, dca: DCAConfig | None = None):
    """Plain-jnp reference this module must equal (the dispatcher's): (out, lse) float32."""
    return reference_attention_lse(q, k_cache, v_cache, q_start=q_start, kv_len=kv_len, dca=dca)


# ----------------------------------------------------------------------------------------------
# One partial: one flash-attention call returning (o, lse) in float32
# ----------------------------------------------------------------------------------------------

def _cudnn_fp32_lse(q, k, v, kv_seqlen, causal: bool):
    """cuDNN via the primitive under jax.nn.dot_product_attention, keeping the fp32 softmax stats."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
    B, T = q.shape[:2]
    q_seqlen = None
    if kv_seqlen is not None:
        q_seqlen = jnp.full((B,), T, jnp.int32)   # cuDNN's padding mask needs both lengths
        mask_type = MaskType.PADDING_CAUSAL if causal else MaskType.PADDING
    else:
        mask_type = MaskType.CAUSAL if causal else MaskType.NO_MASK
    out, stats = dot_product_attention(q, k, v, None, None, q_seqlen, kv_seqlen,
                                       scale=1.0 / float(np.sqrt(q.shape[-1])), mask_type=mask_type,
                                       qkv_layout="BTNH", return_residual=True)
    return out, jnp.transpose(stats, (0, 2, 1))      # stats come as [B, N, T]


def _partial(q, k, v, kv_seqlen, *, causal: bool, impl: str):
    """q [B,T,N,H] vs k/v [B,S',K,H] (keys < kv_seqlen [B] if given). Returns (o [B,T,N,H], lse [B,T,N]) f32."""
    if impl == "cudnn":
        try:
            out, lse = _cudnn_fp32_lse(q, k, v, kv_seqlen, causal)
            return out.astype(jnp.float32), lse.astype(jnp.float32)
        except ImportError:       # private module moved: public API, bf16 lse (see module docstring)
            impl = "cudnn_public"
    out, lse = jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, key_value_seq_lengths=kv_seqlen,
        implementation="cudnn" if impl == "cudnn_public" else "xla", return_residual=True)
    return out.astype(jnp.float32), lse.astype(jnp.float32)


def _window(cache, start, size: int):
    """Rows [start, start + size) of cache [B, S, K, H] per batch (start [B]); rows past S repeat row S-1.

    A gather, not lax.dynamic_slice: dynamic_slice clamps the START when start + size > S, which would
    shift every key; here only the tail past S is clamped, and callers mask it (seqlen or padding rows).
    """
    S = cache.shape[1]
    idx = jnp.clip(start[:, None] + jnp.arange(size, dtype=jnp.int32)[None, :], 0, S - 1)      # [B, size]
    return jnp.take_along_axis(cache, idx[:, :, None, None], axis=1)


# ----------------------------------------------------------------------------------------------
# LSE merge (spec 2.4)
# ----------------------------------------------------------------------------------------------

def _merge(parts, lse_dtype=None):
    """parts: [(o [B,T,N,H], lse [B,T,N], present [B] bool)] -> (o, lse) float32.

    Absent partials get lse = -inf and o = 0 (jnp.where, so a NaN from an empty call cannot leak). A row
    with no partial at all (an idle decode slot with kv_len 0) gets o = 0, lse = -inf, never NaN.
    lse_dtype: round each partial's lse to this dtype first (tests measure what bf16 costs).
    """
    os, lses = [], []
    for o, lse, present in parts:
        if lse_dtype is not None:
            lse = lse.astype(lse_dtype).astype(jnp.float32)
        os.append(jnp.where(present[:, None, None, None], o, 0.0))
        lses.append(jnp.where(present[:, None, None], lse, -jnp.inf))
    o, lse = jnp.stack(os), jnp.stack(lses)                              # [R, B, T, N, (H)]
    m = jnp.max(lse, axis=0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m)                                                 # 0 for absent partials
    z = jnp.sum(w, axis=0)
    z_safe = jnp.where(z > 0, z, 1.0)
    out = jnp.sum(w[..., None] * o, axis=0) / z_safe[..., None]
    return out, jnp.where(z > 0, m + jnp.log(z_safe), -jnp.inf)


# ----------------------------------------------------------------------------------------------
# Public wrapper
# ----------------------------------------------------------------------------------------------

def _concrete(x):
    """numpy value of x, or None when x is traced (under jit)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _validate(q, k_cache, v_cache, q_start, kv_len, dca):
    want = 5 if dca is not None else 4
    if q.ndim != want or (dca is not None and q.shape[0] != 3):
        raise ValueError(f"attention_cudnn: q has shape {q.shape}; expected "
                         + ("[3, B, T, N, H] (intra, succ, inter) with dca" if dca is not None
                            else "[B, T, N, H] without dca"))
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"attention_cudnn: k_cache {k_cache.shape} and v_cache {v_cache.shape} must both "
                         "be [B, S, K, H]")
    B, T, N, H = q.shape[-4:]
    if k_cache.shape[0] != B or k_cache.shape[3] != H or N % k_cache.shape[2]:
        raise ValueError(f"attention_cudnn: q {q.shape} does not fit k_cache {k_cache.shape} "
                         "(batch, head dim, or q heads not a multiple of kv heads)")
    if jnp.shape(q_start) != (B,) or jnp.shape(kv_len) != (B,):
        raise ValueError(f"attention_cudnn: q_start {jnp.shape(q_start)} and kv_len {jnp.shape(kv_len)} "
                         f"must be [B] = ({B},)")


def _dca_segments(qs, kl, T: int, s: int):
    """Static row segments [(a, b)] of a DCA prefill step whose valid rows cross DCA chunk boundaries,
    or None when they do not (or when q_start/kv_len are traced: the documented assumption).

    Only possible with concrete q_start (eager calls, benchmarks, whole-prompt prefill): rows are cut at
    multiples of s, as vLLM's prefill loop does (spec 2.3). Example: s=48, q_start=30, T=70 ->
    [(0, 18), (18, 66), (66, 70)] (positions 30..47, 48..95, 96..99).
    """
    if qs is None or kl is None or T == 1:
        return None
    last = np.minimum(qs + T, kl) - 1                            # last valid query row's position
    crossing = (last >= qs) & (last // s != qs // s)
    if not crossing.any():
        return None
    if np.any(qs != qs[0]):
        b = int(np.argmax(crossing))
        raise ValueError(f"attention_cudnn: DCA prefill rows of sequence {b} span positions "
                         f"[{qs[b]}, {last[b]}], which cross a DCA chunk boundary (multiple of s={s}), and "
                         "the batch's q_start differ; split prefill steps at DCA chunk boundaries")
    q0 = int(qs[0])
    cuts = [0] + [t for t in range(1, T) if (q0 + t) % s == 0] + [T]
    return list(zip(cuts[:-1], cuts[1:]))


def attention_lse(q, k_cache, v_cache, *, q_start, kv_len, dca: DCAConfig | None = None,
                  _implementation: str = "cudnn", _lse_dtype=None):
    """Like `attention` but returns (out [B,T,N,H], lse [B,T,N]) in float32."""
    if _implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"attention_cudnn: _implementation={_implementation!r}, expected {_IMPLEMENTATIONS}")
    _validate(q, k_cache, v_cache, q_start, kv_len, dca)
    B, T = q.shape[-4], q.shape[-3]
    S = k_cache.shape[1]
    # Concrete (numpy) copies when q_start/kv_len are not traced: used to cut a step at DCA boundaries
    # and to skip partials that are absent for every sequence. None under jit.
    qs, kl = _concrete(q_start), _concrete(kv_len)
    kw = dict(dca=dca, _implementation=_implementation, _lse_dtype=_lse_dtype)
    if dca is not None and (segs := _dca_segments(qs, kl, T, dca.chunk_len)) is not None:
        res = [attention_lse(q[:, :, a:b], k_cache, v_cache, q_start=qs + a, kv_len=kl, **kw) for a, b in segs]
        return jnp.concatenate([o for o, _ in res], axis=1), jnp.concatenate([l for _, l in res], axis=1)

    q_start = jnp.asarray(q_start, jnp.int32)
    kv_len = jnp.asarray(kv_len, jnp.int32)
    parts = []

    def add(present, qq, keys, seqlen=None, causal=False):
        """One partial over keys() -> (k, v), keys < seqlen(q_start) [B] if given. present(xp, q_start,
        kv_len) -> [B] bool; with concrete inputs a partial absent for every sequence is not built."""
        if qs is not None and kl is not None and not np.any(present(np, qs, kl)):
            return
        k, v = keys()
        lens = None if seqlen is None else jnp.maximum(seqlen, 1).astype(jnp.int32)
        parts.append((*_partial(qq, k, v, lens, causal=causal, impl=_implementation),
                      present(jnp, q_start, kv_len)))

    def window(start, size):
        return lambda: (_window(k_cache, start, size), _window(v_cache, start, size))

    whole = lambda: (k_cache, v_cache)
    always = lambda xp, a, b: xp.ones(a.shape, bool)
    if dca is None:
        if T == 1:
            end = lambda xp, a, b: xp.minimum(a + 1, b)
            add(lambda xp, a, b: end(xp, a, b) > 0, q, whole, end(jnp, q_start, kv_len))
        else:
            add(lambda xp, a, b: a > 0, q, whole, q_start)
            add(always, q, window(q_start, T), causal=True)
    else:
        s = dca.chunk_len
        chunk_start = (q_start // s) * s
        if T == 1:                      # intra: keys [n*s, p], the new key included
            n_intra = lambda xp, a, b: xp.minimum(a + 1, b) - (a // s) * s
        else:                           # intra prefix: cached keys [n*s, q_start) of this DCA chunk
            n_intra = lambda xp, a, b: a - (a // s) * s
        # S <= s: the whole cache is DCA chunk 0 and chunk_start is 0, no copy needed.
        add(lambda xp, a, b: n_intra(xp, a, b) > 0, q[0], whole if S <= s else window(chunk_start, s),
            n_intra(jnp, q_start, kv_len))
        if T > 1:                       # this step's own keys, causal
            add(always, q[0], window(q_start, T), causal=True)
        if S > s:
            add(lambda xp, a, b: a // s >= 1, q[1], window(jnp.maximum(chunk_start - s, 0), s))
        if S > 2 * s:
            add(lambda xp, a, b: a // s >= 2, q[2], whole, chunk_start - s)
    if not parts:                       # concrete inputs, every slot idle (kv_len 0)
        N, H = q.shape[-2], q.shape[-1]
        return jnp.zeros((B, T, N, H), jnp.float32), jnp.full((B, T, N), -jnp.inf, jnp.float32)
    return _merge(parts, _lse_dtype)


def attention(q, k_cache, v_cache, *, q_start, kv_len, dca: DCAConfig | None = None,
              _implementation: str = "cudnn"):
    """The dispatcher's `cudnn` implementation; contract in zenjax/attention/__init__.py. Returns q's dtype."""
    out, _ = attention_lse(q, k_cache, v_cache, q_start=q_start, kv_len=kv_len, dca=dca,
                           _implementation=_implementation)
    return out.astype(q.dtype)


def run(q, k_cache, v_cache, meta):
    """The dispatcher's entry: (out, lse) float32."""
    return attention_lse(q, k_cache, v_cache, q_start=meta.q_start, kv_len=meta.kv_len, dca=meta.dca)

"""fp8 (e4m3) weights with one float32 scale per output channel: the host-side quantizer (converter and
loader) and the device-side weight the `linear` seam (zenjax/layers.py) multiplies by.

A weight W [in..., out...] becomes values q = round_e4m3(W / s), stored out-major as [out..., in...], and
s [out...] = max over the in dims of |W| / 448 (448: the largest finite e4m3 value), so each output
channel uses the whole e4m3 range.
Because s is constant along the reduction, x @ W = (x @ q) * s: the matmul runs on q (dequantized to the
activation dtype inside the matmul, where XLA fuses the convert into the dot) and one multiply by s per
output follows. Example: a column whose largest |w| is 0.9 gets s = 0.9/448 = 0.002; its entries are
stored as values up to 448 with 3 mantissa bits, a relative rounding of at most 2^-4 each.
"""
from __future__ import annotations

import dataclasses

import jax
import ml_dtypes
import numpy as np

from zenjax.params import ParamSpec

FP8_MAX = 448.0
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Fp8Weight:
    values: jax.Array        # float8_e4m3fn [E?, out..., in...] (out-major: HF's order)
    scale: jax.Array         # float32, the weight's output dims ([E, out...] for stacked experts)


def quantize(spec: ParamSpec, w):
    """A linear weight laid out as `spec` says -> (e4m3 values, float32 scales [E?, out...]). The values
    are always out-major, [E?, out..., in...] (zenjax/params.py says why): a float parameter's in-major
    w [E?, in..., out...] is transposed first; an fp8 spec's (out_major) w is taken as it is. numpy on
    the host (the converter, the loader); a jax array stays on its device (benchmarks quantize random
    weights there). Example: wo [N, H, D] float -> values [D, N, H], scale [D]."""
    from zenjax.params import out_major_order
    xp = jax.numpy if isinstance(w, jax.Array) else np
    if not spec.out_major:
        w = xp.transpose(w, out_major_order(spec))          # numpy: a view; the per-expert copies follow
    lead = 1 if spec.stacked else 0
    if lead and xp is np:         # expert by expert: host temporaries of one expert, not of all E
        q, s = np.empty(w.shape, E4M3), np.empty(w.shape[:w.ndim - spec.in_dims], np.float32)
        for e in range(w.shape[0]):
            q[e], s[e] = _quantize(w[e], spec.in_dims, np)
        return q, s
    return _quantize(w, spec.in_dims, xp)


def _quantize(w, in_dims: int, xp):
    """Out-major w [..., in...]: the scale reduces over the trailing in_dims dims."""
    axes = tuple(range(w.ndim - in_dims, w.ndim))
    wf = xp.asarray(w, xp.float32)
    scale = xp.maximum(xp.abs(wf).max(axis=axes), 1e-12) / FP8_MAX          # [E?, out...]
    q = (wf / scale.reshape(scale.shape + (1,) * in_dims)).astype(E4M3)
    return q, scale.astype(xp.float32)


class QuantizeAtLoad:
    """A load_checkpoint `put` that stores a float checkpoint's FP8_WEIGHTS as e4m3 + scales (one tensor
    at a time on the host, so no full-precision copy of the model is ever on the device). The scales are
    placed as their weights pass and joined to the tree by `merge`."""

    def __init__(self, cfg, quantization: str, put):
        from zenjax.params import QUANTIZATIONS, param_specs
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={quantization!r}: expected one of {QUANTIZATIONS} or None")
        self.specs, self.put, self.scales = param_specs(cfg, quantization), put, {}

    def __call__(self, path, spec: ParamSpec, array):
        from zenjax.params import FP8_DTYPE, scale_name
        target = self.specs[path]
        if target.dtype != FP8_DTYPE:
            return self.put(path, spec, array)
        values, scale = quantize(spec, array)              # spec: the float checkpoint's in-major layout
        sp = path[:-1] + (scale_name(path[-1]),)
        self.scales[sp] = self.put(sp, self.specs[sp], scale)
        return self.put(path, target, values)

    def merge(self, params: dict) -> dict:
        from zenjax.params import nested_set
        for p, v in self.scales.items():
            nested_set(params, p, v)
        return params

"""Rotary position embedding, neox "rotate-half" layout (spec section 1.1).

inv_freq[i] = theta^(-2i/H) computed in float32; angle = position * inv_freq; the cos/sin tables are the
angle vector concatenated with itself (length H); x' = x*cos + rotate_half(x)*sin with
rotate_half(x) = concat(-x[H/2:], x[:H/2]).
"""
from __future__ import annotations

import jax.numpy as jnp


def inv_freq(head_dim: int, theta: float):
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x, positions, theta: float):
    """x [..., T, heads, H] rotated by positions [..., T] (any int dtype; leading axes broadcast against
    x's, so x[None] with positions [3, B, T] gives the three DCA query variants [3, B, T, heads, H] in one
    elementwise pass, with no stack). Math in float32, result in x.dtype."""
    H = x.shape[-1]
    angle = positions.astype(jnp.float32)[..., None] * inv_freq(H, theta)      # [..., T, H/2]
    cos = jnp.concatenate([jnp.cos(angle)] * 2, axis=-1)[..., None, :]        # [..., T, 1, H]
    sin = jnp.concatenate([jnp.sin(angle)] * 2, axis=-1)[..., None, :]
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., H // 2:], xf[..., :H // 2]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)

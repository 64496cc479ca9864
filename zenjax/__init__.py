"""zenjax: long-context Qwen2/Qwen2.5 inference in JAX and Pallas.

Names are imported lazily so that `python -m zenjax.client` does not pay for importing JAX.
"""
__version__ = "0.1.0"

_LAZY = {"DCAConfig": "zenjax.config", "EngineConfig": "zenjax.config", "ModelConfig": "zenjax.config",
         "SamplingParams": "zenjax.sampling"}


def load(path=None, **kwargs):
    """Load a converted checkpoint (default: the embedded model) into an Engine. See zenjax.engine."""
    from zenjax.engine import load as _load
    return _load(path, **kwargs)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zenjax' has no attribute {name!r}")

"""zenjax: long-context Qwen2/Qwen2.5 inference in JAX and Pallas."""
from zenjax.config import DCAConfig, EngineConfig, ModelConfig  # noqa: F401
from zenjax.sampling import SamplingParams  # noqa: F401

__version__ = "0.1.0"


def load(path=None, **kwargs):
    """Load a converted checkpoint (default: the embedded model) into an Engine. See zenjax.engine."""
    from zenjax.engine import load as _load
    return _load(path, **kwargs)

"""ea_local: keep long contexts inside a fixed KV budget with Expected Attention eviction."""
from ._libllama import preload as _preload

__version__ = "0.1.0"

# before any submodule can import numpy (DESIGN.md: the CUDA build crashed with the other order)
LIBLLAMA = _preload()

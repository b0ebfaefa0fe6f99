"""ea_local: keep long contexts inside a fixed KV budget with Expected Attention eviction."""
__version__ = "0.1.0"

"""What a GGUF file says (header, hyper-parameters, RoPE, KV cost, chat template) and the embedded models."""

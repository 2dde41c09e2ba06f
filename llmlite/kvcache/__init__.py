"""KV-cache quantization: a KIVI-style quantized cache for transformers, perplexity read back
through the cache, and generation with it."""

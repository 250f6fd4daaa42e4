"""Layer 1: loading models, their hook sites, the KV cache's forward pass."""

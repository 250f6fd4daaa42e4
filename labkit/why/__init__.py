"""Layer 3: why a token came out (named activations, gradient attribution, direct logit attribution)."""

"""Layer 2: pure measures of distributions and attention (entropy, lens, head patterns, transfer entropy)."""

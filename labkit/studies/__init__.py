"""Layer 6: studies built from Session calls (sweeps)."""

"""Layer 0: errors, optional extras, atomic files, token texts, spec strings, the memory budget."""

"""Layer 2: records and their pictures (Step, Trace, beam trees, results, static HTML, figures)."""

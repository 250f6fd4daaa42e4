"""Layer 6: the course's tools (exercise checks, student copies, the workshop hub, the kernel)."""

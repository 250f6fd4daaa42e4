"""Layer 7: screens and commands (the command line, the magics, the Lab's panels)."""


def __getattr__(name: str) -> object:
    """``labkit.ui.panels`` (and ``cli``, ``magics``) imported on first use: the widgets stay out of start-up, and a
    missing 'lab' extra surfaces as MissingExtra when the panels are reached."""
    if name in ("panels", "cli", "magics"):
        import importlib

        return importlib.import_module(f"labkit.ui.{name}")
    raise AttributeError(f"module 'labkit.ui' has no attribute {name!r}")

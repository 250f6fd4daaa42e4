"""Layer 7: screens and commands (the command line, the magics, the Lab's panels)."""

"""The ``name:key=value,key=value`` specs the CLI and notebooks use for samplers and intervention recipes."""

from __future__ import annotations

from typing import Any

from labkit.core.errors import InvalidArgument


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: Any, what: str) -> tuple[str, dict[str, Any]]:
    """(name, settings) from ``name[:key=value,...]``; values become int or float when they read as one.
    ``what`` names the kind of spec in errors (e.g. "sampler")."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgument(f"{what} spec must be a string like 'name:key=value'; got {spec!r}")
    name, _, args = spec.strip().partition(":")
    settings: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise InvalidArgument(f"{what} setting {item!r} in {spec!r} must look like key=value")
        settings[key.strip()] = _value(value.strip())
    return name.strip(), settings

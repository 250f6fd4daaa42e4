"""IPython extension: ``%load_ext labkit`` (the labkit kernel loads it at start).

- ``%labkit next <prompt>``: the next-token distribution after the prompt;
- ``%%labkit generate [--max-new-tokens N] [--sampler SPEC] [--seed S] [--chat]`` (cell body = prompt): a
  TokenStream of the generation (the Trace is left in the user's namespace as ``labkit_trace``);
- ``%labkit lab``: the Lab panel; ``%labkit session``: the shared Session.

All verbs share one Session per kernel (the default model, loaded on first use).
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from labkit.core.errors import LabkitError
from labkit.core.extras import require

require("lab", "the %labkit magics", "IPython")

from IPython.core.error import UsageError  # noqa: E402 (after the check that names the extra)
from IPython.core.magic import Magics, line_cell_magic, magics_class  # noqa: E402
from IPython.display import display  # noqa: E402

USAGE = ("%labkit next <prompt> | %labkit lab | %labkit session | "
         "%%labkit generate [--max-new-tokens N] [--sampler SPEC] [--seed S] [--chat]")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would exit the kernel
        raise UsageError(f"%%labkit generate: {message}; usage: {USAGE}")


def _generate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="%%labkit generate", add_help=False)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--sampler", default=None, help="a sampler spec, e.g. 'classic:temperature=0.7'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true")
    return p


@magics_class
class LabkitMagics(Magics):
    """``%labkit`` / ``%%labkit``; the Session is made on first use and kept for the kernel's life."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._session: Any = None

    def session(self) -> Any:
        """The kernel's shared Session (the default model, loaded on first use)."""
        if self._session is None:
            import labkit

            self._session = labkit.Session(progress=False)
        return self._session

    @line_cell_magic
    def labkit(self, line: str, cell: str | None = None) -> Any:
        """``%labkit VERB ...`` / ``%%labkit VERB ...``: next, generate, lab, session (see the module)."""
        words = shlex.split(line)
        if not words:
            raise UsageError(f"usage: {USAGE}")
        verb, rest = words[0], line.strip()[len(words[0]):].strip()
        try:
            if verb == "generate" and cell is not None:
                return self._generate(words[1:], cell)
            if cell is not None:
                raise UsageError(f"only 'generate' takes a cell body; usage: {USAGE}")
            if verb == "next":
                if not rest:
                    raise UsageError("%labkit next needs a prompt, e.g. %labkit next The capital of France is")
                return self.session().next_token(rest)
            if verb == "lab":
                from labkit.ui.panels import Lab

                return Lab(self.session())
            if verb == "session":
                return self.session()
            raise UsageError(f"unknown verb {verb!r}; usage: {USAGE}")
        except LabkitError as exc:
            raise UsageError(str(exc)) from None

    def _generate(self, args: list[str], prompt: str) -> None:
        from labkit.sampling import parse_sampler
        from labkit.sampling.beam import strategy_arguments
        from labkit.ui.panels import TokenStream

        opts = _generate_parser().parse_args(args)
        sampler = parse_sampler(opts.sampler) if opts.sampler else None
        trace = self.session().generate(prompt.strip("\n"), max_new_tokens=opts.max_new_tokens,
                                        **strategy_arguments(sampler),
                                        seed=opts.seed, chat=opts.chat)
        self.shell.user_ns["labkit_trace"] = trace
        display(TokenStream(trace))


def load_ipython_extension(ipython: Any) -> None:
    """Register the ``%labkit`` / ``%%labkit`` magics (``%load_ext labkit``)."""
    ipython.register_magics(LabkitMagics)

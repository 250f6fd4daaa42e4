"""Install and remove the workshop kernelspec "Python (labkit)" (template in the top-level ``kernels_ext/``
folder, shipped in the wheel as ``labkit/_kernels_ext``), through jupyter_client's KernelSpecManager."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from labkit.core.errors import InvalidArgument, check_int
from labkit.core.extras import require

KERNEL_NAME = "labkit"
_HERE = Path(__file__).resolve().parents[1]  # the labkit package folder


def template_dir() -> Path:
    """The folder of the kernelspec template (inside the wheel, or ``kernels_ext/`` in a checkout)."""
    for folder in (_HERE / "_kernels_ext" / KERNEL_NAME, _HERE.parent / "kernels_ext" / KERNEL_NAME):
        if (folder / "kernel.json").is_file():
            return folder
    raise FileNotFoundError("the labkit kernelspec template is missing (labkit/_kernels_ext or kernels_ext/); "
                            "reinstall labkit")


def default_threads() -> int:
    """Half the CPUs, at least 1: a workshop machine is shared by several students' kernels."""
    return max(1, (os.cpu_count() or 2) // 2)


def spec(threads: int | None = None, python: str | None = None) -> dict:
    """The kernel.json for this interpreter (``python``, default ``sys.executable``) and ``threads``."""
    threads = default_threads() if threads is None else threads
    check_int("threads", threads, 1)
    text = (template_dir() / "kernel.json").read_text()
    text = text.replace("{python}", json.dumps(python or sys.executable)[1:-1]).replace("{threads}", str(threads))
    return json.loads(text)


def install(user: bool = False, prefix: str | None = None, threads: int | None = None,
            python: str | None = None) -> str:
    """Install the kernelspec (``user``: the user's Jupyter folder; ``prefix``: ``<prefix>/share/jupyter``;
    neither: the system folder) for interpreter ``python`` (default this one); returns the folder written to."""
    require("lab", "the workshop kernel", "jupyter_client", "IPython")
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / KERNEL_NAME
        shutil.copytree(template_dir(), folder)
        (folder / "kernel.json").write_text(json.dumps(spec(threads, python), indent=2) + "\n")
        (folder / "README.md").unlink(missing_ok=True)
        return KernelSpecManager().install_kernel_spec(str(folder), KERNEL_NAME, user=user, prefix=prefix)


def remove() -> str:
    """Remove the installed kernelspec; returns the folder removed (InvalidArgument when none is installed)."""
    require("lab", "the workshop kernel", "jupyter_client")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        return KernelSpecManager().remove_kernel_spec(KERNEL_NAME)
    except (NoSuchKernel, KeyError):  # jupyter_client 8 raises KeyError for an unknown name
        raise InvalidArgument(f"no kernelspec named {KERNEL_NAME!r} is installed") from None

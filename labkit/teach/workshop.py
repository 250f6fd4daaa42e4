"""A one-machine JupyterHub for a class: ``labkit workshop --users N [--port P]``.

Shared-password login for student1..studentN (JupyterHub's SharedPasswordAuthenticator), one single-user
JupyterLab per student (the simple local spawner: every student's server runs as this Unix user, in its own home
folder under the workshop folder — fine on a class machine, no isolation between students), a personal copy of the
teaching notebooks without their solution cells (:mod:`labkit.teach.teaching`), the labkit kernelspec "Python (labkit)"
as the default kernel, and the default model converted once into labkit's cache, shared by every kernel
(``LABKIT_CACHE``) and made read-only. The proxy is the Python ``configurable-http-proxy`` package (no Node).
Beyond one machine, see the documentation's workshop page (Zero to JupyterHub).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from labkit.core.errors import InvalidArgument, check_int
from labkit.core.extras import require

_REPO_NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
SERVER_MIB = 90
"""Resident memory of one idle single-user Jupyter server (measured here: 90 MiB)."""


@dataclass(frozen=True)
class WorkshopConfig:
    """Everything the hub configuration needs."""

    folder: Path
    users: int
    port: int
    password: str
    notebooks: Path
    """The students' copy of the teaching notebooks (written by :func:`labkit.teach.teaching.student_copy`)."""
    cache: Path

    @property
    def url(self) -> str:
        """The hub's address on this machine."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def usernames(self) -> list[str]:
        """The students' user names, ``student1`` … ``studentN``."""
        return [f"student{i}" for i in range(1, self.users + 1)]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check(users: int, port: int, password: str | None, notebooks: str | os.PathLike[str] | None) -> None:
    """InvalidArgument for a bad user count, port, password (≥ 8 characters) or notebooks folder."""
    check_int("users", users, 1, 500)
    check_int("port", port, 1024, 65535)
    if password is not None and len(password) < 8:
        raise InvalidArgument("password must be at least 8 characters (JupyterHub's shared-password rule)")
    if notebooks is not None and not Path(notebooks).is_dir():
        raise InvalidArgument(f"notebooks {str(notebooks)!r} is not a folder")


def prepare(folder: str | os.PathLike[str], users: int = 10, port: int = 8000, password: str | None = None,
            notebooks: str | os.PathLike[str] | None = None) -> WorkshopConfig:
    """Convert the default model once (into labkit's cache, which every student's kernel then reads; its model
    folder is made read-only), install the labkit kernelspec into this environment, and write
    ``folder/jupyterhub_config.py``."""
    from labkit.model import models
    from labkit.teach import kernelspec

    require("workshop", "labkit workshop", "jupyterhub", "configurable_http_proxy")
    require("lab", "labkit workshop", "jupyterlab", "jupyter_client", "nbconvert")
    check(users, port, password, notebooks)
    source = Path(notebooks) if notebooks is not None else _REPO_NOTEBOOKS
    if not source.is_dir():
        raise InvalidArgument("no teaching notebooks found (the repository's notebooks/ folder); pass --notebooks")
    root = Path(folder).resolve()
    root.mkdir(parents=True, exist_ok=True)
    from labkit.teach import teaching

    students = root / "student-notebooks"  # the students' copy: solution cells removed, outputs cleared
    if students.exists():
        shutil.rmtree(students)
    teaching.student_copy(source, students)
    model = models.prepare_default_model(progress=True)
    _read_only(model)
    cpus = os.cpu_count() or 2
    kernelspec.install(prefix=sys.prefix, threads=max(1, cpus // min(users, cpus)))
    cfg = WorkshopConfig(root, users, port, password or secrets.token_urlsafe(9), students,
                         models.cache_dir().resolve())
    (root / "jupyterhub_config.py").write_text(hub_config(cfg))
    return cfg


def _read_only(folder: Path) -> None:
    """Remove write permission from the converted model (students load it; nobody converts it again)."""
    for path in [*folder.rglob("*"), folder]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def hub_config(cfg: WorkshopConfig) -> str:
    """The jupyterhub_config.py text for ``cfg``."""
    bin_dir = Path(sys.executable).parent
    args = ["--MappingKernelManager.default_kernel_name=labkit", "--ServerApp.default_url=/lab/tree/notebooks"]
    if os.geteuid() == 0:
        args.append("--allow-root")
    env = {"LABKIT_CACHE": str(cfg.cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "JUPYTER_PATH": str(Path(sys.prefix) / "share" / "jupyter")}
    q = json.dumps
    return f'''# Written by `labkit workshop`; start it with: jupyterhub -f {cfg.folder / "jupyterhub_config.py"}
import shutil
from pathlib import Path

c = get_config()  # noqa: F821 (defined by JupyterHub)
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {cfg.port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {free_port()}
c.JupyterHub.db_url = {q("sqlite:///" + str(cfg.folder / "jupyterhub.sqlite"))}
c.JupyterHub.cookie_secret_file = {q(str(cfg.folder / "jupyterhub_cookie_secret"))}
c.JupyterHub.pid_file = {q(str(cfg.folder / "jupyterhub.pid"))}
c.JupyterHub.cleanup_servers = True
c.ConfigurableHTTPProxy.command = [{q(str(bin_dir / "configurable-http-proxy"))}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
c.ConfigurableHTTPProxy.pid_file = {q(str(cfg.folder / "proxy.pid"))}

# a shared password for the class: student1..student{cfg.users}
c.JupyterHub.authenticator_class = "jupyterhub.authenticators.shared.SharedPasswordAuthenticator"
c.SharedPasswordAuthenticator.user_password = {q(cfg.password)}
c.Authenticator.allowed_users = set({q(cfg.usernames)})

# one JupyterLab per student, in its own home folder, with the labkit kernel as the default
c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.SimpleLocalProcessSpawner.home_dir_template = {q(str(cfg.folder / "home" / "{username}"))}
c.Spawner.cmd = [{q(str(bin_dir / "jupyterhub-singleuser"))}]
c.Spawner.args = {q(args)}
c.Spawner.environment = {q(env)}
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120


def copy_notebooks(spawner):
    """A personal copy of the teaching notebooks, made once (a student's edits are never overwritten)."""
    target = Path(spawner.home_dir) / "notebooks"
    if not target.exists():
        shutil.copytree({q(str(cfg.notebooks))}, target)


c.Spawner.pre_spawn_hook = copy_notebooks
'''


def per_student_memory(dtype: str = "float32") -> dict[str, float]:
    """Memory (MiB) of a fresh Python that loads the default model in ``dtype`` and generates a few tokens, i.e.
    one student's kernel: ``peak`` (during loading) and ``steady`` (resident afterwards). Each student's JupyterLab
    server adds about 90 MiB."""
    # The peak is the new process image's own high-water mark (VmHWM, KiB). Not ru_maxrss: on Linux a child
    # inherits its parent's maxrss through fork, so a large parent (a test run) would be reported as the child's peak.
    code = ("import gc, resource, psutil, labkit\n"
            f"s = labkit.Session(dtype={dtype!r}, progress=False)\n"
            "s.generate('Hello', max_new_tokens=4)\ngc.collect()\n"
            "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
            "print(float(hwm[0]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,\n"
            "      psutil.Process().memory_info().rss / 2**20)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    peak, steady = (float(x) for x in out.split()[-2:])  # MiB
    return {"peak": peak, "steady": steady}


def start(cfg: WorkshopConfig) -> subprocess.Popen:
    """Start JupyterHub on ``cfg`` (its own process group, so it can be stopped by process id with its children)."""
    hub = Path(sys.executable).parent / "jupyterhub"
    return subprocess.Popen([str(hub), "-f", str(cfg.folder / "jupyterhub_config.py")], cwd=cfg.folder,
                            start_new_session=True)


def serve(cfg: WorkshopConfig) -> int:
    """Run JupyterHub until it ends; Ctrl-C or SIGTERM stop it, and it stops every student's server first."""
    hub = start(cfg)

    def forward(signum: int, _frame: object) -> None:
        hub.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return hub.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

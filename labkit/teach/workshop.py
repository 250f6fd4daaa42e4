"""A one-machine JupyterHub for a class: ``labkit workshop --users N [--port P] [--ip 0.0.0.0 --self-signed]``.

It listens on 127.0.0.1 unless ``--ip`` says otherwise (the room's network then reaches it, and a warning says what
that exposes); ``--ssl-cert``/``--ssl-key`` or ``--self-signed`` serve it over HTTPS.

Shared-password login for student1..studentN (JupyterHub's SharedPasswordAuthenticator), one single-user
JupyterLab per student (the simple local spawner: every student's server runs as this Unix user, in its own home
folder under the workshop folder — fine on a class machine, no isolation between students), a personal copy of the
teaching notebooks without their solution cells (:mod:`labkit.teach.teaching`), the labkit kernelspec "Python (labkit)"
as the default kernel, and the default model converted once into labkit's cache, shared by every kernel
(``LABKIT_CACHE``) and made read-only. The proxy is the Python ``configurable-http-proxy`` package (no Node).
Beyond one machine, see the documentation's workshop page (Zero to JupyterHub).
"""

from __future__ import annotations

import ipaddress
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
    ip: str = "127.0.0.1"
    """The address the hub listens on: loopback (this machine only), one of its addresses, or 0.0.0.0 (all)."""
    ssl_cert: Path | None = None
    """TLS certificate (PEM) the hub serves with, and its key; None: plain HTTP."""
    ssl_key: Path | None = None
    inner_port: int = 0
    """With TLS: the loopback port of the hub's own proxy, behind :mod:`labkit.teach.tls_front` (0: no TLS)."""

    @property
    def url(self) -> str:
        """The hub's address: https when TLS is on; this machine's name when it listens on every interface."""
        host = socket.gethostname() if self.ip in ("0.0.0.0", "::") else self.ip
        return f"{'https' if self.ssl_cert else 'http'}://{host}:{self.port}/"

    @property
    def public(self) -> bool:
        """Whether other machines can reach the hub (it does not listen on loopback only)."""
        return not ipaddress.ip_address(self.ip).is_loopback

    def warning(self) -> str:
        """What the teacher must know when the hub is reachable from the room's network ("" on loopback)."""
        if not self.public:
            return ""
        text = (f"the hub listens on {self.ip}: anyone on this network can reach its login page with the class "
                "password; every student's server runs as this Unix user (students are not isolated from each other)")
        if self.ssl_cert is None:
            text += "; without TLS the password travels in clear text: add --self-signed or --ssl-cert/--ssl-key"
        return text

    @property
    def usernames(self) -> list[str]:
        """The students' user names, ``student1`` … ``studentN``."""
        return [f"student{i}" for i in range(1, self.users + 1)]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check(users: int, port: int, password: str | None, notebooks: str | os.PathLike[str] | None,
          ip: str = "127.0.0.1", ssl_cert: str | os.PathLike[str] | None = None,
          ssl_key: str | os.PathLike[str] | None = None) -> None:
    """InvalidArgument for a bad user count, port, password (≥ 8 characters), notebooks folder, address, or a TLS
    certificate given without its key (or a missing file)."""
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise InvalidArgument(f"ip must be an IP address of this machine (127.0.0.1, 0.0.0.0 for every interface, "
                              f"or one of its addresses); got {ip!r}") from None
    if (ssl_cert is None) != (ssl_key is None):
        raise InvalidArgument("ssl_cert and ssl_key go together: give both (PEM files) or neither")
    for name, path in (("ssl_cert", ssl_cert), ("ssl_key", ssl_key)):
        if path is not None and not Path(path).is_file():
            raise InvalidArgument(f"{name} {str(path)!r} is not a file")
    check_int("users", users, 1, 500)
    check_int("port", port, 1024, 65535)
    if password is not None and len(password) < 8:
        raise InvalidArgument("password must be at least 8 characters (JupyterHub's shared-password rule)")
    if notebooks is not None and not Path(notebooks).is_dir():
        raise InvalidArgument(f"notebooks {str(notebooks)!r} is not a folder")


def prepare(folder: str | os.PathLike[str], users: int = 10, port: int = 8000, password: str | None = None,
            notebooks: str | os.PathLike[str] | None = None, ip: str = "127.0.0.1",
            ssl_cert: str | os.PathLike[str] | None = None, ssl_key: str | os.PathLike[str] | None = None,
            self_signed: bool = False) -> WorkshopConfig:
    """Convert the default model once (into labkit's cache, which every student's kernel then reads; its model
    folder is made read-only), install the labkit kernelspec into this environment, and write
    ``folder/jupyterhub_config.py`` (readable by this user only: it holds the class password). ``ip`` is where the
    hub listens; ``ssl_cert``/``ssl_key`` serve it over TLS, or ``self_signed`` makes a certificate for the class
    (``folder/tls``, valid 30 days, for this machine's name and addresses)."""
    from labkit.model import models
    from labkit.teach import kernelspec

    require("workshop", "labkit workshop", "jupyterhub", "configurable_http_proxy")
    require("lab", "labkit workshop", "jupyterlab", "jupyter_client", "nbconvert")
    check(users, port, password, notebooks, ip, ssl_cert, ssl_key)
    if self_signed and ssl_cert is not None:
        raise InvalidArgument("give self_signed or ssl_cert/ssl_key, not both")
    source = Path(notebooks) if notebooks is not None else _REPO_NOTEBOOKS
    if not source.is_dir():
        raise InvalidArgument("no teaching notebooks found (the repository's notebooks/ folder); pass --notebooks")
    root = Path(folder).resolve()
    root.mkdir(parents=True, exist_ok=True)
    from labkit.teach import teaching

    students = root / "student-notebooks"  # the students' copy: solutions encoded in reveal cells, outputs cleared
    if students.exists():
        shutil.rmtree(students)
    key = root / "answer-key.md"  # the teacher's, beside the configuration
    teaching.student_copy(source, students, key=key)
    key.chmod(0o600)
    model = models.prepare_default_model(progress=True)
    _read_only(model)
    cpus = os.cpu_count() or 2
    kernelspec.install(prefix=sys.prefix, threads=max(1, cpus // min(users, cpus)))
    if self_signed:
        ssl_cert, ssl_key = self_signed_certificate(root / "tls", ip)
    cfg = WorkshopConfig(root, users, port, password or secrets.token_urlsafe(9), students,
                         models.cache_dir().resolve(), ip,
                         None if ssl_cert is None else Path(ssl_cert).resolve(),
                         None if ssl_key is None else Path(ssl_key).resolve(),
                         0 if ssl_cert is None else free_port())
    config = root / "jupyterhub_config.py"
    config.touch(mode=0o600)
    config.chmod(0o600)  # the class password is in it
    config.write_text(hub_config(cfg))
    return cfg


def self_signed_certificate(folder: Path, ip: str) -> tuple[Path, Path]:
    """A self-signed TLS certificate and its key (PEM, the key readable by this user only) for this machine: its
    name, localhost, 127.0.0.1 and ``ip``; valid 30 days (a class). Browsers warn once; students accept it.
    Written with ``cryptography`` (a dependency of JupyterHub)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, socket.gethostname())])
    addresses = {ipaddress.ip_address("127.0.0.1")} | ({ipaddress.ip_address(ip)} if ip not in ("0.0.0.0", "::")
                                                         else set())
    san = x509.SubjectAlternativeName([x509.DNSName(socket.gethostname()), x509.DNSName("localhost"),
                                       *(x509.IPAddress(a) for a in sorted(addresses, key=str))])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30)).add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    key_path.touch(mode=0o600)
    key_path.chmod(0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


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
    if cfg.ssl_cert is None:
        listen = f"c.JupyterHub.ip = {q(cfg.ip)}\nc.JupyterHub.port = {cfg.port}"
    else:  # the proxy on loopback; labkit.teach.tls_front serves TLS on ip:port in front of it
        listen = (f"# TLS on {cfg.ip}:{cfg.port} is labkit.teach.tls_front's (started by labkit workshop)\n"
                  f"c.JupyterHub.ip = \"127.0.0.1\"\nc.JupyterHub.port = {cfg.inner_port}")
    return f'''# Written by `labkit workshop`; start it with: jupyterhub -f {cfg.folder / "jupyterhub_config.py"}
import shutil
from pathlib import Path

c = get_config()  # noqa: F821 (defined by JupyterHub)
{listen}
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


def start_tls(cfg: WorkshopConfig) -> subprocess.Popen | None:
    """With TLS: :mod:`labkit.teach.tls_front` on ``cfg.ip:cfg.port`` in front of the hub's proxy (None without)."""
    if cfg.ssl_cert is None:
        return None
    return subprocess.Popen([sys.executable, "-m", "labkit.teach.tls_front", cfg.ip, str(cfg.port),
                             str(cfg.inner_port), str(cfg.ssl_cert), str(cfg.ssl_key)])


def serve(cfg: WorkshopConfig) -> int:
    """Run JupyterHub (and, with TLS, the TLS front) until it ends; Ctrl-C or SIGTERM stop it, and it stops every
    student's server first."""
    hub = start(cfg)
    front = start_tls(cfg)

    def forward(signum: int, _frame: object) -> None:
        hub.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return hub.wait()
    finally:
        if front is not None:
            front.terminate()
            front.wait(10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

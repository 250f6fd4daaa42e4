"""A one-machine JupyterHub for a class: ``labkit workshop --users N [--port P] [--ip 0.0.0.0 --self-signed]``.

It listens on 127.0.0.1 unless ``--ip`` says otherwise (the room's network then reaches it, and a warning says what
that exposes); ``--ssl-cert``/``--ssl-key`` or ``--self-signed`` serve it over HTTPS.

Shared-password login for student1..studentN (JupyterHub's SharedPasswordAuthenticator), one single-user
JupyterLab per student. Run as root, each student is a Unix user (``labkit-student1`` …, created here, removed by
``labkit workshop --remove-users``) whose home only they can open, so no student reads another's work or the
teacher's folder (:mod:`labkit.teach.isolation`, :mod:`labkit.teach.spawners`); without root (or with
``--shared-user``) every server runs as this user in ``DIR/home/<student>`` and students are not isolated. Each
student gets a personal copy of the teaching notebooks without their solution cells (:mod:`labkit.teach.teaching`),
the labkit kernelspec "Python (labkit)" as the default kernel, a memory limit per process (``--memory-limit``), and the
default model converted once into labkit's cache, shared by every kernel (``LABKIT_CACHE``) and made read-only. The
proxy is the Python ``configurable-http-proxy`` package (no Node). Beyond one machine, see the documentation's
workshop page (Zero to JupyterHub).

The workshop folder: ``jupyterhub_config.py`` and ``answer-key.md`` (mode 0600), ``state/`` (the hub's database,
cookie secret and process ids), ``student-notebooks/`` and ``tls/`` (0700), and, with isolation, ``runtime/`` and
``cache/`` that every student reads; the folder itself is 0711 (students pass through it, cannot list it).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
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
from labkit.core.memory import fmt_bytes, parse_bytes
from labkit.teach import isolation

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
    isolate: bool = False
    """One Unix user per student (``prefix`` + name); False: every server runs as this user."""
    prefix: str = isolation.PREFIX
    python: Path | None = None
    """The interpreter the students' servers and kernels run (None: this one)."""
    mem_limit: int | None = None
    """Bytes each student process (server, each kernel) may use (its data segment); None: no limit."""
    solutions: Path | None = None
    """The teacher's notebooks (with the solutions) the student copy was made from."""

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
        """What the teacher must know: the hub is reachable from the room's network, or the notebooks with the
        solutions are readable by the students' Unix users ("" when neither)."""
        texts = []
        if self.public:
            text = (f"the hub listens on {self.ip}: anyone on this network can reach its login page with the class "
                    "password")
            if not self.isolate:
                text += ("; every student's server runs as this Unix user (students can read each other's work and "
                         "your files: run labkit workshop as root for one Unix user per student)")
            if self.ssl_cert is None:
                text += "; without TLS the password travels in clear text: add --self-signed or --ssl-cert/--ssl-key"
            texts.append(text)
        if self.isolate and self.solutions is not None and isolation.blocked(self.solutions) is None:
            texts.append(f"your notebooks with the solutions ({self.solutions}) can be read by every user of this "
                         f"machine, students included: chmod o-rx {self.solutions} (or keep them in a private folder)")
        return "; ".join(texts)

    @property
    def memory_text(self) -> str:
        """The per-process memory limit in words ("3.0 GiB", "none")."""
        return "none" if self.mem_limit is None else fmt_bytes(self.mem_limit)

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


def memory_limit(value: str | int | None, users: int) -> int | None:
    """Bytes per student process from ``value``: a size (``"3GiB"``), ``"none"``, or None for the fair share —
    90 % of this machine's RAM divided among the students (at least 1 GiB)."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    if value is not None:
        return parse_bytes(value, "memory_limit")
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(2**30, int(0.9 * total / users))


def prepare(folder: str | os.PathLike[str], users: int = 10, port: int = 8000, password: str | None = None,
            notebooks: str | os.PathLike[str] | None = None, ip: str = "127.0.0.1",
            ssl_cert: str | os.PathLike[str] | None = None, ssl_key: str | os.PathLike[str] | None = None,
            self_signed: bool = False, isolate: bool | None = None, prefix: str = isolation.PREFIX,
            mem_limit: str | int | None = None) -> WorkshopConfig:
    """Convert the default model once (into labkit's cache, which every student's kernel then reads; its model
    folder is made read-only), install the labkit kernelspec, and write ``folder/jupyterhub_config.py`` (readable by
    this user only: it holds the class password). ``ip`` is where the hub listens; ``ssl_cert``/``ssl_key`` serve it
    over TLS, or ``self_signed`` makes a certificate for the class (``folder/tls``, valid 30 days, for this machine's
    name and addresses). ``isolate`` (default: when run as root) creates one Unix user per student and an
    interpreter they can run (:func:`labkit.teach.isolation.student_python`); ``mem_limit`` (bytes, a size, "none";
    default: :func:`memory_limit`'s fair share) caps each student process."""
    from labkit.teach import kernelspec

    require("workshop", "labkit workshop", "jupyterhub", "configurable_http_proxy")
    require("lab", "labkit workshop", "jupyterlab", "jupyter_client", "nbconvert")
    check(users, port, password, notebooks, ip, ssl_cert, ssl_key)
    if self_signed and ssl_cert is not None:
        raise InvalidArgument("give self_signed or ssl_cert/ssl_key, not both")
    source = Path(notebooks) if notebooks is not None else _REPO_NOTEBOOKS
    if not source.is_dir():
        raise InvalidArgument("no teaching notebooks found (the repository's notebooks/ folder); pass --notebooks")
    isolate = os.geteuid() == 0 if isolate is None else isolate
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,20}", prefix):
        raise InvalidArgument(f"prefix must be the start of a Unix user name (lower-case letters, digits, '-', '_'; "
                              f"at most 21 characters); got {prefix!r}")
    limit = memory_limit(mem_limit, users)
    root = _workshop_folder(folder, isolate)
    if isolate:
        isolation.create_users([f"student{i}" for i in range(1, users + 1)], prefix)
    students = _course_copy(source, root)
    python, cache = _students_environment(root, isolate)
    cpus = os.cpu_count() or 2
    kernelspec.install(prefix=str(_prefix(python)), threads=max(1, cpus // min(users, cpus)), python=str(python))
    if self_signed:
        ssl_cert, ssl_key = self_signed_certificate(root / "tls", ip)
    cfg = WorkshopConfig(root, users, port, password or secrets.token_urlsafe(9), students, cache, ip,
                         None if ssl_cert is None else Path(ssl_cert).resolve(),
                         None if ssl_key is None else Path(ssl_key).resolve(),
                         0 if ssl_cert is None else free_port(), isolate, prefix, python, limit, source.resolve())
    config = root / "jupyterhub_config.py"
    config.touch(mode=0o600)
    config.chmod(0o600)  # the class password is in it
    config.write_text(hub_config(cfg))
    return cfg


def _workshop_folder(folder: str | os.PathLike[str], isolate: bool) -> Path:
    """The workshop folder, made: 0711 with isolation (students pass through to runtime/ and cache/, nobody lists
    it), else 0700, with its private ``state/``. With isolation, InvalidArgument when a folder above it is closed to
    other users (checked before any Unix user is created)."""
    root = Path(folder).resolve()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o711 if isolate else 0o700)
    closed = isolation.blocked(root) if isolate else None
    if closed not in (None, root):
        raise InvalidArgument(f"students cannot reach the workshop folder {root}: {closed} is closed to other users; "
                              "choose a --dir every user can pass through (e.g. under /srv or /opt)")
    (root / "state").mkdir(mode=0o700, exist_ok=True)
    return root


def _course_copy(source: Path, root: Path) -> Path:
    """``root/student-notebooks`` (solutions encoded in reveal cells, outputs cleared; 0700: the hub copies it into
    each home, a student never reads it here) and the teacher's ``root/answer-key.md`` (0600)."""
    from labkit.teach import teaching

    students = root / "student-notebooks"
    if students.exists():
        shutil.rmtree(students)
    key = root / "answer-key.md"
    teaching.student_copy(source, students, key=key)
    students.chmod(0o700)
    key.chmod(0o600)
    return students


def _students_environment(root: Path, isolate: bool) -> tuple[Path, Path]:
    """(the interpreter the students' servers and kernels run, the labkit cache they read): the default model
    converted once and made read-only; with isolation, an interpreter and a cache every student can reach (the
    model linked into ``root/cache`` when the teacher's cache is private)."""
    from labkit.model import models

    model = models.prepare_default_model(progress=True)
    _read_only(model)
    cache, python = models.cache_dir().resolve(), Path(sys.executable)
    if not isolate:
        return python, cache
    python = isolation.student_python(root)
    if isolation.blocked(model) is not None:
        cache = root / "cache"
        linked = cache / model.relative_to(models.cache_dir())
        isolation.link_tree(model, linked)
        _read_only(linked)
    for path in (python, cache):
        if (closed := isolation.blocked(path)) is not None:
            raise InvalidArgument(f"students cannot reach {path}: {closed} is closed to other users; put the "
                                  "workshop folder (--dir) where every user can pass through")
    return python, cache


def self_signed_certificate(folder: Path, ip: str) -> tuple[Path, Path]:
    """A self-signed TLS certificate and its key (PEM, the key readable by this user only) for this machine: its
    name, localhost, 127.0.0.1 and ``ip``; valid 30 days (a class). Browsers warn once; students accept it.
    Written with ``cryptography`` (a dependency of JupyterHub)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
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


def _prefix(python: Path) -> Path:
    """The environment of interpreter ``python`` (``.../bin/python`` → ``...``; this one: ``sys.prefix``)."""
    return Path(sys.prefix) if python == Path(sys.executable) else python.parent.parent


def _read_only(folder: Path) -> None:
    """Remove write permission from the converted model (students load it; nobody converts it again)."""
    for path in [*folder.rglob("*"), folder]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def hub_config(cfg: WorkshopConfig) -> str:
    """The jupyterhub_config.py text for ``cfg``."""
    bin_dir = Path(sys.executable).parent
    python = cfg.python or Path(sys.executable)
    args = ["--MappingKernelManager.default_kernel_name=labkit", "--ServerApp.default_url=/lab/tree/notebooks"]
    if os.geteuid() == 0 and not cfg.isolate:
        args.append("--allow-root")
    env = {"LABKIT_CACHE": str(cfg.cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "JUPYTER_PATH": str(_prefix(python) / "share" / "jupyter")}
    q = json.dumps
    state = cfg.folder / "state"
    if cfg.ssl_cert is None:
        listen = f"c.JupyterHub.ip = {q(cfg.ip)}\nc.JupyterHub.port = {cfg.port}"
    else:  # the proxy on loopback; labkit.teach.tls_front serves TLS on ip:port in front of it
        listen = (f"# TLS on {cfg.ip}:{cfg.port} is labkit.teach.tls_front's (started by labkit workshop)\n"
                  f"c.JupyterHub.ip = \"127.0.0.1\"\nc.JupyterHub.port = {cfg.inner_port}")
    if cfg.isolate:
        spawner = (f'c.JupyterHub.spawner_class = "labkit.teach.spawners.StudentSpawner"\n'
                   f"c.StudentSpawner.prefix = {q(cfg.prefix)}  # student1 runs as the Unix user {cfg.prefix}student1")
    else:
        spawner = ('c.JupyterHub.spawner_class = "labkit.teach.spawners.SharedSpawner"  # as this user: not isolated\n'
                   f"c.SharedSpawner.home_dir_template = {q(str(cfg.folder / 'home' / '{username}'))}")
    kind = "StudentSpawner" if cfg.isolate else "SharedSpawner"
    limit = "None" if cfg.mem_limit is None else f"{cfg.mem_limit}  # {fmt_bytes(cfg.mem_limit)}"
    return f'''# Written by `labkit workshop`; start it with: jupyterhub -f {cfg.folder / "jupyterhub_config.py"}
c = get_config()  # noqa: F821 (defined by JupyterHub)
{listen}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {free_port()}
c.JupyterHub.db_url = {q("sqlite:///" + str(state / "jupyterhub.sqlite"))}
c.JupyterHub.cookie_secret_file = {q(str(state / "jupyterhub_cookie_secret"))}
c.JupyterHub.pid_file = {q(str(state / "jupyterhub.pid"))}
c.JupyterHub.cleanup_servers = True
c.ConfigurableHTTPProxy.command = [{q(str(bin_dir / "configurable-http-proxy"))}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
c.ConfigurableHTTPProxy.pid_file = {q(str(state / "proxy.pid"))}

# a shared password for the class: student1..student{cfg.users}
c.JupyterHub.authenticator_class = "jupyterhub.authenticators.shared.SharedPasswordAuthenticator"
c.SharedPasswordAuthenticator.user_password = {q(cfg.password)}
c.Authenticator.allowed_users = set({q(cfg.usernames)})

# one JupyterLab per student with a personal copy of the notebooks and the labkit kernel as the default
{spawner}
c.{kind}.notebooks = {q(str(cfg.notebooks))}
c.Spawner.mem_limit = {limit}
c.Spawner.cmd = [{q(str(python))}, "-m", "jupyterhub.singleuser"]
c.Spawner.args = {q(args)}
c.Spawner.environment = {q(env)}
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
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

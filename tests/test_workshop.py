"""`labkit workshop`: a real JupyterHub on a free loopback port; a student logs in over HTTP, spawns a server, and a
kernel cell generates one token with labkit on the default model; everything is stopped by process id."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
import websocket

from labkit.core.errors import InvalidArgument
from labkit.teach import isolation, workshop

BIN = Path(sys.executable).parent
PASSWORD = "labkit-class-2026"


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _execute(url: str, token: str, kernel: str, code: str) -> str:
    """Run ``code`` in a kernel over the Jupyter websocket protocol; returns its stdout."""
    ws = websocket.create_connection(f"ws://{url.split('://')[1]}api/kernels/{kernel}/channels",
                                     header=[f"Authorization: token {token}"], timeout=180)
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({"header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                                   "session": uuid.uuid4().hex, "version": "5.3"},
                        "parent_header": {}, "metadata": {}, "channel": "shell",
                        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                                    "allow_stdin": False, "stop_on_error": True}}))
    out, reply = [], None
    while reply is None:
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("\n".join(msg["content"]["traceback"]))
        elif msg["msg_type"] == "execute_reply":
            reply = msg["content"]
    ws.close()
    assert reply["status"] == "ok", "".join(out)
    return "".join(out)


def _launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "labkit"), "workshop", "--password", PASSWORD, "--no-measure", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_hub(hub: subprocess.Popen, url: str) -> None:
    def up():
        if hub.poll() is not None:
            raise AssertionError(f"labkit workshop exited: {hub.stdout.read()}")
        try:
            return requests.get(f"{url}/hub/api", timeout=2).ok
        except requests.ConnectionError:
            return False
    _wait(up, 180, "the hub")


def _login(url: str, student: str) -> requests.Session:
    """Log ``student`` in through the hub's form (which starts their server); returns the browser session."""
    web = requests.Session()
    web.get(f"{url}/hub/login")
    r = web.post(f"{url}/hub/login", data={"username": student, "password": PASSWORD, "_xsrf": web.cookies["_xsrf"]})
    assert r.ok and "jupyterhub-session-id" in web.cookies
    assert "/hub/spawn" in r.url  # logging in starts the student's server
    return web


def _token_when_ready(web: requests.Session, url: str, student: str) -> str:
    """An API token of ``student``'s, once their server is ready."""
    # the XSRF token is bound to the login session: read it from a hub page
    api = {"X-XSRFToken": re.search(r'xsrf_token:\s*"([^"]+)"', web.get(f"{url}/hub/token").text).group(1)}
    _wait(lambda: web.get(f"{url}/hub/api/users/{student}", headers=api).json()["servers"].get("", {})
          .get("ready"), 180, f"{student}'s server")
    return web.post(f"{url}/hub/api/users/{student}/tokens", headers=api, json={"note": "test"}).json()["token"]


def _kernel(user: str, token: str) -> str:
    kernel = requests.post(f"{user}api/kernels", headers={"Authorization": f"token {token}"}, json={},
                           timeout=30).json()
    assert kernel["name"] == "labkit"  # the default kernel is "Python (labkit)"
    return kernel["id"]


def _stop_all(hub: subprocess.Popen, family: set[int]) -> None:
    os.killpg(hub.pid, signal.SIGTERM)  # the CLI forwards it; JupyterHub stops the servers and the proxy
    try:
        hub.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(hub.pid, signal.SIGKILL)
    for pid in family:  # anything left over is killed by process id
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)


def test_workshop_hub_student_kernel_generates(tmp_path):
    port = workshop.free_port()
    hub = _launch("--users", "2", "--port", str(port), "--dir", str(tmp_path), "--shared-user")
    url = f"http://127.0.0.1:{port}"
    family: set[int] = set()
    try:
        _wait_for_hub(hub, url)
        web = requests.Session()
        web.get(f"{url}/hub/login")
        r = web.post(f"{url}/hub/login", data={"username": "student1", "password": "wrong-password",
                                               "_xsrf": web.cookies["_xsrf"]})
        assert "Invalid username or password" in r.text
        web = _login(url, "student1")
        token = _token_when_ready(web, url, "student1")
        user = f"{url}/user/student1/"
        auth = {"Authorization": f"token {token}"}
        notebooks = requests.get(f"{user}api/contents/notebooks", headers=auth, timeout=10).json()
        assert "01_warmup.ipynb" in {f["name"] for f in notebooks["content"]}  # a personal copy
        copy = tmp_path / "home" / "student1" / "notebooks" / "06_capstone.ipynb"
        cells = json.loads(copy.read_text())["cells"]  # the student copy: no solution cells, no outputs
        assert not [c for c in cells if "solution" in c.get("metadata", {}).get("tags", [])]
        assert any("check" in c.get("metadata", {}).get("tags", []) for c in cells)
        assert not any(c.get("outputs") for c in cells if c["cell_type"] == "code")
        kernel = _kernel(user, token)
        family |= {p.pid for p in psutil.Process(hub.pid).children(recursive=True)}
        out = _execute(user, token, kernel, "import os, labkit\n"
                       "t = labkit.Session().generate('The capital of France is', max_new_tokens=1)\n"
                       "from labkit.model.models import default_model_dir\n"
                       "print(repr(t.text), os.environ['HF_HUB_OFFLINE'], default_model_dir(), sep='|')")
        text, offline, model_dir = out.strip().split("|")
        assert text == repr(" Paris")
        assert offline == "1"
        from labkit.model import models

        assert model_dir == str(models.default_model_dir().resolve())  # the shared, already converted cache
        family |= {p.pid for p in psutil.Process(hub.pid).children(recursive=True)}
    finally:
        _stop_all(hub, family)
    left = [pid for pid in family if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not left, f"processes left running: {left}"
    assert len(family) >= 3  # hub, proxy, the student's server (+ its kernel)
    assert not (isolation.CGROUP_V1 / isolation.CGROUP_GROUP / "shared-student1").exists()  # its memory group too


_ATTEMPT = """import os, pwd, resource, labkit
def attempt(path):
    try:
        (os.listdir if os.path.isdir(path) else lambda p: open(p, 'rb').read(1))(path)
        return 'read'
    except PermissionError:
        return 'PermissionError'
t = labkit.Session().generate('The capital of France is', max_new_tokens=1)
from labkit.core import memory
cgroup = [l.split(':', 2)[2].strip() for l in open('/proc/self/cgroup') if l.split(':')[1] in ('memory', '')][0]
print(pwd.getpwuid(os.getuid()).pw_name, repr(t.text), resource.getrlimit(resource.RLIMIT_DATA)[0],
      memory.free_ram(), cgroup, *(attempt(p) for p in PATHS), sep='|')
"""


def test_a_students_memory_cgroup_caps_what_labkit_may_spend():
    folder = isolation.memory_cgroup("lk-test-budget", 2**30)
    if folder is None:
        pytest.skip("no memory cgroup can be made here (not root, or no memory controller)")
    try:
        code = "from labkit.core import memory; print(memory.free_ram())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             preexec_fn=lambda: (folder / "cgroup.procs").write_text(str(os.getpid())))
        assert 0 < int(out.stdout) <= 2**30  # what is left under the student's limit, not the machine's free RAM
    finally:
        isolation.remove_cgroups("lk-test-budget")
    assert not folder.exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                    reason="one Unix user per student needs root and useradd")
def test_each_student_is_a_unix_user_who_cannot_read_another_students_or_the_teachers_notebooks():
    import pwd

    prefix = f"lk{uuid.uuid4().hex[:6]}-"  # users of this test only
    base = Path(tempfile.mkdtemp(prefix="labkit-isolation-", dir="/tmp"))  # a machine-wide folder (pytest's is 0700)
    base.chmod(0o711)
    teacher = base / "teacher"  # the teacher's notebooks, with the solutions, in a private folder
    teacher.mkdir(mode=0o700)
    shutil.copytree(workshop._REPO_NOTEBOOKS, teacher / "notebooks")
    folder = base / "workshop"
    port = workshop.free_port()
    hub = _launch("--users", "2", "--port", str(port), "--dir", str(folder), "--user-prefix", prefix,
                  "--notebooks", str(teacher / "notebooks"), "--memory-limit", "3GiB")
    url = f"http://127.0.0.1:{port}"
    family: set[int] = set()
    try:
        _wait_for_hub(hub, url)
        webs = {s: _login(url, s) for s in ("student1", "student2")}  # both servers start
        tokens = {s: _token_when_ready(web, url, s) for s, web in webs.items()}
        homes = {s: Path(pwd.getpwnam(prefix + s).pw_dir) for s in webs}
        assert all(h.stat().st_mode & 0o777 == 0o700 for h in homes.values())
        assert all(h.stat().st_uid == pwd.getpwnam(prefix + s).pw_uid for s, h in homes.items())
        paths = [homes["student1"] / "notebooks" / "06_capstone.ipynb",  # their own: readable
                 homes["student2"] / "notebooks" / "06_capstone.ipynb", homes["student2"],
                 teacher / "notebooks" / "06_capstone.ipynb", folder / "answer-key.md",
                 folder / "jupyterhub_config.py", folder / "state" / "jupyterhub.sqlite", folder]
        assert all(p.exists() for p in paths)
        user = f"{url}/user/student1/"
        kernel = _kernel(user, tokens["student1"])
        family |= {p.pid for p in psutil.Process(hub.pid).children(recursive=True)}
        out = _execute(user, tokens["student1"], kernel, f"PATHS = {[str(p) for p in paths]!r}\n{_ATTEMPT}")
        name, text, limit, free, cgroup, *results = out.strip().split("|")
        assert name == prefix + "student1" and text == repr(" Paris")  # the kernel runs as the student
        assert int(limit) == 3 * 2**30 and int(free) < 3 * 2**30  # the limit holds, and labkit's budget sees it
        if isolation.CGROUP_V1.joinpath("memory.limit_in_bytes").exists() and os.access(isolation.CGROUP_V1, os.W_OK):
            assert cgroup == f"/labkit-workshop/{prefix}student1"  # all of student1's processes in one group
        seen = dict(zip(map(str, paths), results, strict=True))
        assert results == ["read"] + ["PermissionError"] * (len(paths) - 1), seen
    finally:
        _stop_all(hub, family)
        removed = subprocess.run([str(BIN / "labkit"), "workshop", "--remove-users", "--user-prefix", prefix],
                                 capture_output=True, text=True)
        shutil.rmtree(base, ignore_errors=True)
    assert removed.returncode == 0, removed.stderr
    for student in ("student1", "student2"):
        with pytest.raises(KeyError):
            pwd.getpwnam(prefix + student)
    assert not homes["student1"].exists()


def test_workshop_arguments_and_memory_figure():
    with pytest.raises(InvalidArgument, match="users"):
        workshop.check(0, 8000, None, None)
    with pytest.raises(InvalidArgument, match="password must be at least 8"):
        workshop.check(2, 8000, "short", None)
    with pytest.raises(InvalidArgument, match="port"):
        workshop.check(2, 80, None, None)
    mem = workshop.per_student_memory("float32")
    weights = 134.5e6 * 4 / 2**20  # SmolLM2-135M in fp32 (MiB)
    assert weights < mem["steady"] < 4096 and weights < mem["peak"] < 4096


def test_the_hub_answers_over_tls_with_a_certificate_made_for_the_class(tmp_path):
    port = workshop.free_port()
    hub = _launch("--users", "1", "--port", str(port), "--dir", str(tmp_path), "--self-signed", "--shared-user")
    cert = tmp_path / "tls" / "cert.pem"
    try:
        def up():
            if hub.poll() is not None:
                raise AssertionError(f"labkit workshop exited: {hub.stdout.read()}")
            if not cert.exists():
                return False
            try:  # verified against the class's certificate: its names include 127.0.0.1
                return requests.get(f"https://127.0.0.1:{port}/hub/login", timeout=2, verify=str(cert)).ok
            except (requests.ConnectionError, requests.exceptions.SSLError):
                return False
        _wait(up, 120, "the hub over TLS")
        web = requests.Session()  # verify= on each call: requests lets REQUESTS_CA_BUNDLE override Session.verify
        page = web.get(f"https://127.0.0.1:{port}/hub/login", timeout=5, verify=str(cert))
        assert page.ok and "password" in page.text.lower()
        form = {"username": "student1", "_xsrf": web.cookies["_xsrf"]}
        wrong = web.post(f"https://127.0.0.1:{port}/hub/login", data={**form, "password": "wrong-password"},
                         timeout=5, verify=str(cert))
        assert "Invalid username or password" in wrong.text  # the login form works through the TLS front
        with pytest.raises(requests.ConnectionError):  # nothing answers in clear text on that port
            requests.get(f"http://127.0.0.1:{port}/hub/login", timeout=5)
        assert (tmp_path / "jupyterhub_config.py").stat().st_mode & 0o077 == 0  # the password stays the teacher's
        assert (tmp_path / "tls" / "key.pem").stat().st_mode & 0o077 == 0
    finally:
        _stop_all(hub, set())


def test_a_hub_on_the_rooms_network_says_what_that_exposes(tmp_path):
    cfg = workshop.WorkshopConfig(tmp_path, 2, 8000, "x" * 9, tmp_path, tmp_path)
    assert cfg.warning() == "" and cfg.url == "http://127.0.0.1:8000/"
    public = workshop.WorkshopConfig(tmp_path, 2, 8000, "x" * 9, tmp_path, tmp_path, ip="0.0.0.0")
    assert "anyone on this network" in public.warning() and "clear text" in public.warning()
    assert 'c.JupyterHub.ip = "0.0.0.0"' in workshop.hub_config(public)
    cert, key = workshop.self_signed_certificate(tmp_path / "tls", "192.0.2.7")
    secure = workshop.WorkshopConfig(tmp_path, 2, 8000, "x" * 9, tmp_path, tmp_path, ip="192.0.2.7",
                                     ssl_cert=cert, ssl_key=key, inner_port=8123)
    assert secure.url == "https://192.0.2.7:8000/" and "clear text" not in secure.warning()
    config = workshop.hub_config(secure)  # the proxy stays on loopback; the TLS front listens on ip:port
    assert 'c.JupyterHub.ip = "127.0.0.1"\nc.JupyterHub.port = 8123' in config
    from cryptography import x509

    names = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert {str(a) for a in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "192.0.2.7"}
    private = workshop.WorkshopConfig(tmp_path, 2, 8000, "x" * 9, tmp_path, tmp_path, isolate=True,
                                      solutions=tmp_path)  # under pytest's folder, mode 0700
    assert private.warning() == ""
    shared = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        shared.chmod(0o755)  # the solutions where every Unix user can read them: the teacher is told
        exposed = workshop.WorkshopConfig(tmp_path, 2, 8000, "x" * 9, tmp_path, tmp_path, isolate=True,
                                          solutions=shared)
        assert f"chmod o-rx {shared}" in exposed.warning()
    finally:
        shared.rmdir()
    with pytest.raises(InvalidArgument, match="students cannot reach the workshop folder"):  # before any user
        workshop.prepare(tmp_path / "workshop", users=1, isolate=True, prefix="lknever-")
    with pytest.raises(InvalidArgument, match="prefix must be the start of a Unix user name"):
        workshop.prepare(tmp_path / "workshop", users=1, isolate=True, prefix="Bad Prefix")
    with pytest.raises(InvalidArgument, match="ip must be an IP address"):
        workshop.check(2, 8000, None, None, ip="the-room")
    with pytest.raises(InvalidArgument, match="ssl_cert and ssl_key go together"):
        workshop.check(2, 8000, None, None, ssl_cert=cert)


def test_students_get_a_python_of_their_own_when_the_teachers_environment_is_out_of_their_reach(tmp_path,
                                                                                                  monkeypatch):
    """The fallback for a virtual environment under a private home: a venv from the system Python with hard-linked
    copies of the packages and of labkit; it imports labkit, torch and JupyterHub's single-user server from there."""
    import sysconfig

    from labkit.teach import isolation

    if isolation._system_python() is None:
        pytest.skip("no system Python of this version that every user can run")
    private = {Path(sysconfig.get_paths()["purelib"]), Path(workshop.__file__).parents[1]}  # as if under /root
    real = isolation.blocked
    monkeypatch.setattr(isolation, "blocked", lambda p: Path(p) if Path(p) in private else real(p))
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        python = isolation.student_python(folder)
        assert python == folder / "runtime" / "bin" / "python"
        code = ("import labkit, torch, jupyterhub.singleuser, sys; "
                "print(labkit.__file__, torch.__file__, sys.prefix, sep='|')")
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                             cwd=folder).stdout  # not the checkout: its labkit/ would come first
        labkit_file, torch_file, prefix = out.strip().split("|")
        assert labkit_file.startswith(str(folder / "runtime")) and torch_file.startswith(str(folder / "runtime"))
        assert prefix == str(folder / "runtime")
        assert (folder / "runtime" / "share" / "jupyter" / "lab").is_dir()  # JupyterLab's assets for the server
    finally:
        shutil.rmtree(folder, ignore_errors=True)

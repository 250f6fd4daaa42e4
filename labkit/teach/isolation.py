"""Students who cannot read each other's work: one Unix user per student (as The Littlest JupyterHub does), an
interpreter every student can run, and a memory limit per student process.

``labkit workshop`` run as root creates ``labkit-student1`` … (home folders mode 0700, marked in their comment field
as made by labkit) and :mod:`labkit.teach.spawners` starts each student's server as that user;
``labkit workshop --remove-users`` deletes them with their homes. Students must be able to run Python and read the
installed packages: when labkit's environment is not reachable by other users (a virtual environment under a home
folder such as ``/root``), :func:`student_python` builds one beside the workshop that is — a virtual environment
made from a system Python of the same version whose ``site-packages`` are the teacher's (or hard-linked copies of
them where the teacher's are out of reach).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

from labkit.core import memory
from labkit.core.errors import InvalidArgument

PREFIX = "labkit-"
"""Unix user name = PREFIX + the hub's name (``student1`` → ``labkit-student1``)."""
MARKER = "labkit workshop student"
"""The comment (GECOS) field of every user labkit creates: only such users are reused or removed."""


def blocked(path: str | os.PathLike[str]) -> Path | None:
    """The first folder on the way to ``path`` (or ``path`` itself) that other Unix users cannot pass through or
    read — checked along the path as written and along its resolved target; None when every user can read it."""
    written = Path(path).absolute()
    for candidate in (written, written.resolve()):
        for folder in reversed(candidate.parents):  # from / down
            if not folder.stat().st_mode & stat.S_IXOTH:
                return folder
    target = written.resolve()
    mode = target.stat().st_mode
    need = stat.S_IROTH | (stat.S_IXOTH if target.is_dir() or mode & stat.S_IXUSR else 0)
    return None if mode & need == need else target


def _open_to_all(path: Path) -> None:
    """Let other users read ``path`` (and pass through it, for folders and programs)."""
    mode = path.stat().st_mode
    extra = stat.S_IROTH | stat.S_IRGRP
    if path.is_dir() or mode & stat.S_IXUSR:
        extra |= stat.S_IXOTH | stat.S_IXGRP
    path.chmod(mode | extra)


def link_tree(source: Path, target: Path) -> None:
    """Copy the tree ``source`` to ``target`` with hard links (a plain copy across file systems); the copy's folders
    and files are readable by every user (the links share the source's inode, so its files are made readable too)."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, symlinks=True, copy_function=link, dirs_exist_ok=True)
    for folder, dirs, files in os.walk(target):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if not path.is_symlink():
                _open_to_all(path)
    _open_to_all(target)


def _system_python() -> Path | None:
    """A Python of this version (major.minor) that every user can run, or None."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [Path(sys.base_prefix) / "bin" / f"python{version}", Path(f"/usr/bin/python{version}"),
                  Path(f"/usr/local/bin/python{version}")]
    found = shutil.which(f"python{version}")
    candidates += [Path(found)] if found else []
    return next((c for c in candidates if c.is_file() and blocked(c) is None), None)


def student_python(folder: Path) -> Path:
    """An interpreter with labkit's packages that every student can run: this one when other users can reach it and
    its packages, else ``folder/runtime/bin/python`` (built once: a virtual environment from a system Python of this
    version, seeing the teacher's ``site-packages`` through a ``.pth`` file, hard-linked copies where those are out of
    reach, and this environment's Jupyter data and configuration). InvalidArgument when no such Python exists.
    Delete ``folder/runtime`` to rebuild it after upgrading packages that were copied there."""
    import labkit

    sites = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    needed = [Path(sys.executable), *map(Path, sites), Path(labkit.__file__).parent]
    if all(blocked(p) is None for p in needed):
        return Path(sys.executable)
    runtime = folder / "runtime"
    python = runtime / "bin" / "python"
    if python.exists():
        return python
    base = _system_python()
    if base is None:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise InvalidArgument(
            f"students cannot run this Python ({sys.executable}: {blocked(sys.executable)} is closed to other users) "
            f"and no Python {version} every user can run was found (/usr/bin/python{version}); install it "
            f"(e.g. apt install python{version} python{version}-venv) or put labkit's environment where every user can "
            "read it")
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(runtime)], check=True, capture_output=True)
    for path in [runtime, *runtime.rglob("*")]:  # the venv's own files (the links below are opened as they are made)
        if not path.is_symlink():
            _open_to_all(path)
    own = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip())
    reach = [site for site in sites if blocked(site) is None]
    for site in sorted(set(sites) - set(reach)):  # out of reach: merged into the runtime's site-packages as hard links
        link_tree(Path(site), own)
    package = Path(labkit.__file__).parent
    if blocked(package) is not None:  # an editable install's source folder out of reach (merged with its data)
        link_tree(package, own / "labkit")
    # addsitedir (not a bare path line) so the teacher's own .pth files run too (an editable install's is one)
    (own / "labkit-teacher.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in reach))
    for part in ("share/jupyter", "etc/jupyter"):  # JupyterLab's assets, extensions and server configuration
        if (Path(sys.prefix) / part).is_dir():
            link_tree(Path(sys.prefix) / part, runtime / part)
            _open_to_all((runtime / part).parent)
    _open_to_all(own / "labkit-teacher.pth")
    return python


CGROUP_V1, CGROUP_V2 = memory.CGROUP_V1_MEMORY, memory.CGROUP_V2
CGROUP_GROUP = "labkit-workshop"


def memory_cgroup(name: str, limit: int) -> Path | None:
    """A memory cgroup holding every process of one student (their server and all their kernels together), limited
    to ``limit`` bytes — cgroup v1's ``memory/labkit-workshop/<name>`` or v2's ``labkit-workshop/<name>`` — or None
    where this process cannot create one (not root, no memory controller). A process joins it by writing its pid to
    ``cgroup.procs``."""
    try:
        if (CGROUP_V1 / "memory.limit_in_bytes").exists():
            folder = CGROUP_V1 / CGROUP_GROUP / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "memory.limit_in_bytes").write_text(str(limit))
            return folder
        if "memory" in (CGROUP_V2 / "cgroup.controllers").read_text().split():
            parent = CGROUP_V2 / CGROUP_GROUP
            parent.mkdir(exist_ok=True)
            (parent / "cgroup.subtree_control").write_text("+memory")
            folder = parent / name
            folder.mkdir(exist_ok=True)
            (folder / "memory.max").write_text(str(limit))
            return folder
    except OSError:
        return None
    return None


def remove_cgroups(name: str) -> bool:
    """Remove a student's memory cgroup and the workshop's, once empty; True when the student's is gone (a cgroup
    that still holds a process, e.g. a kernel still exiting, stays)."""
    for base in (CGROUP_V1, CGROUP_V2):
        for folder in (base / CGROUP_GROUP / name, base / CGROUP_GROUP):
            with contextlib.suppress(OSError):  # not there, or not empty yet
                folder.rmdir()
    return not any((base / CGROUP_GROUP / name).exists() for base in (CGROUP_V1, CGROUP_V2))


def unix_name(student: str, prefix: str = PREFIX) -> str:
    """The Unix user of a student: ``prefix + student``."""
    return f"{prefix}{student}"


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise InvalidArgument(f"{what} needs root (run labkit workshop with sudo), or use --shared-user")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        raise InvalidArgument(f"{what} needs useradd and userdel (the passwd package)")


def create_users(students: list[str], prefix: str = PREFIX) -> list[pwd.struct_passwd]:
    """Create (or reuse, when labkit made them) one Unix user per student, each with a home folder only its owner
    can open (mode 0700), no password (they log in through the hub only); returns their passwd entries. A user of
    that name that labkit did not make is refused, not reused."""
    _need_root("one Unix user per student")
    entries = []
    for student in students:
        name = unix_name(student, prefix)
        try:
            existing = pwd.getpwnam(name)
        except KeyError:
            existing = None
        if existing is not None and existing.pw_gecos != MARKER:
            raise InvalidArgument(f"a Unix user {name!r} already exists and labkit did not create it; choose another "
                                  "--user-prefix")
        if existing is None:
            subprocess.run(["useradd", "--create-home", "--user-group", "--shell", "/bin/bash", "--comment", MARKER,
                            name], check=True, capture_output=True)
        entry = pwd.getpwnam(name)
        Path(entry.pw_dir).chmod(0o700)
        entries.append(entry)
    return entries


def remove_users(prefix: str = PREFIX) -> list[str]:
    """Delete every Unix user labkit created with ``prefix`` and its home folder; returns their names."""
    _need_root("removing the students' Unix users")
    names = [p.pw_name for p in pwd.getpwall() if p.pw_name.startswith(prefix) and p.pw_gecos == MARKER]
    for name in names:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)  # a server left running
        subprocess.run(["userdel", "--remove", name], check=True, capture_output=True)
        remove_cgroups(name)
    return names

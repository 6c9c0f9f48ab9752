"""``runtime.procs.pid_gone``: running, exited-and-reaped, and zombie processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from runtime.procs import pid_gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zombies are read from /proc")
def test_a_zombie_counts_as_gone_a_running_process_does_not():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not pid_gone(child.pid)
        assert not pid_gone(os.getpid())
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not pid_gone(child.pid):  # dead but not waited for: a zombie, still signalable
            assert time.monotonic() < deadline, "a killed, unreaped child should read as gone"
            time.sleep(0.05)
        os.kill(child.pid, 0)  # still a process-table entry: os.kill alone would have said alive
    finally:
        child.kill()
        child.wait()
    assert pid_gone(child.pid)


def test_process_one_is_running():
    assert not pid_gone(1)

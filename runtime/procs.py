"""Whether a process of this host still runs, for leases and temporary files named after their process."""
from __future__ import annotations

import os


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs: no such process, or a zombie (exited, not yet reaped: a killed server's
    worker processes stay zombies where PID 1 does not reap orphans, as in many containers). A process that
    exists but belongs to another user counts as running (pid reuse errs on running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True  # it went between the two checks
    except OSError:
        return False  # no /proc (not Linux): os.kill said it exists
    # "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the last ")"
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] in (b"Z", b"X")

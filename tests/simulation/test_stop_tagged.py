"""`stop_tagged` on real processes shaped like a simulation's Ray: a tagged parent in its own
process group (Flower's SuperExec, the raylet) and a child that sets its title as Ray's
agents do, which wipes the environment /proc shows, tag included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from simulation.federated import RUN_TAG, stop_tagged, tagged_processes
from tests.deployment.loopback import descendants, processes, send_signal, wait_until

# both ignore SIGTERM, as ray::DashboardAgent and ray::RuntimeEnvAgent were seen to; the
# parent, given a PID, answers SIGTERM with a SIGINT to it: a Ctrl-C inside the cleanup, whatever the load
CHILD = ("import signal, time; from ray._raylet import setproctitle; "
         "signal.signal(signal.SIGTERM, signal.SIG_IGN); setproctitle('ray::StopTaggedTest'); time.sleep(300)")
PARENT = ("import os, signal, subprocess, sys, time; target = int(sys.argv[1]); "
          "signal.signal(signal.SIGTERM, (lambda *_: os.kill(target, signal.SIGINT)) if target else signal.SIG_IGN); "
          f"subprocess.Popen([sys.executable, '-c', {CHILD!r}]); time.sleep(300)")


def _alive(*pids: int) -> list[int]:
    table = processes()
    return [pid for pid in pids if pid in table and table[pid][1] != "Z"]


@pytest.fixture
def ray_like(request):
    """(tag, parent PID, child PID) once the child has taken its title; both killed after.
    ``request.param`` true: the parent interrupts this process when it gets SIGTERM."""
    tag = uuid.uuid4().hex
    target = os.getpid() if getattr(request, "param", False) else 0
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(target)], env={**os.environ, RUN_TAG: tag},
                              start_new_session=True)
    child = wait_until(lambda: [pid for pid, argv in descendants(parent.pid).items()
                                if argv and argv[0].startswith("ray::StopTaggedTest")], 60, "the child's title")[0]
    try:
        yield tag, parent.pid, child
    finally:
        for pid in (child, parent.pid):
            send_signal(pid, signal.SIGKILL)
        parent.wait()


def test_stop_tagged_stops_what_the_tag_alone_misses(ray_like):
    tag, parent, child = ray_like
    assert tagged_processes(tag) == [parent]  # the child's title wiped its tag: the case to handle
    stop_tagged(tag, grace=1.0)
    assert _alive(parent, child) == []


@pytest.mark.parametrize("ray_like", [True], indirect=True)
def test_a_second_interrupt_waits_until_everything_is_stopped(ray_like):
    """Ctrl-C pressed again while the first one's cleanup runs ends the program only after
    the cleanup, not halfway through it."""
    tag, parent, child = ray_like
    with pytest.raises(KeyboardInterrupt):
        stop_tagged(tag, grace=1.0)
    assert _alive(parent, child) == []

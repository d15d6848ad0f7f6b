"""Which processes used the CPU over an interval, from /proc (Linux): run it beside a
simulation to see what a round's training shares the cores with.

Prints each process's CPU time over the interval as a share of one core and of the
machine, and the total of everything that is not a simulated site (``ClientAppActor``).

    python benchmarks/cpu_share.py [--seconds 30] [--top 12]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

SITE = "ClientAppActor"


def cpu_ticks() -> dict[int, tuple[int, str]]:
    """pid -> (user + system clock ticks so far, command line)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # the process ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
        name = cmdline or stat[stat.index("(") + 1 : stat.rindex(")")]
        out[int(proc.name)] = (int(fields[11]) + int(fields[12]), name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    hz, cores = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    before = cpu_ticks()
    t0 = time.monotonic()
    time.sleep(args.seconds)
    after = cpu_ticks()
    elapsed = time.monotonic() - t0
    used = sorted(((ticks - before[pid][0]) / hz / elapsed, name) for pid, (ticks, name) in after.items()
                  if pid in before and ticks > before[pid][0])[::-1]
    print(f"{elapsed:.0f} s, {cores} cores\n\n| process | % of one core | % of the machine |\n|---|---:|---:|")
    for share, name in used[: args.top]:
        print(f"| `{name[:70]}` | {100 * share:.1f} | {100 * share / cores:.1f} |")
    others = sum(share for share, name in used if SITE not in name)
    print(f"\neverything but the simulated sites ({SITE}): {100 * others:.1f}% of one core, "
          f"{100 * others / cores:.1f}% of the machine")


if __name__ == "__main__":
    main()

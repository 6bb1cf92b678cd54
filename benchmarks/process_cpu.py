#!/usr/bin/env python
"""Where one command's CPU goes: runs a command in a session of its own and samples the CPU time
of every process in that session (Ray's head, raylet, dashboard, actors, workers, MLflow...), by
role, until the command ends.

    python benchmarks/process_cpu.py -- paceray train search_spaces/quick.yaml --set train.steps=100

A role is the process's title as Ray sets it (`ray::TrainController`, `ray::RayTrainWorker`...)
or its program's name. A process that ends between two samples loses what it used since the last
one (`--every` seconds): the totals are lower bounds, the per-process figures are what a fixed cost
is made of.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time

import psutil


def role(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    if not cmd:
        return p.name()
    head = cmd[0]
    if head.startswith("ray::"):
        return head.split()[0].split(".")[0]
    for part in cmd[:3]:
        base = os.path.basename(part)
        if base.endswith((".py", "raylet", "gcs_server")) or base in ("paceray", "mlflow", "ray", "gunicorn", "uvicorn"):
            return base
    return os.path.basename(head)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=float, default=0.25)
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, tuple[str, float, float]] = {}  # pid -> (role, cpu s, first seen at)
    while proc.poll() is None:
        for q in psutil.process_iter():
            try:
                if os.getsid(q.pid) != proc.pid:
                    continue
                t = q.cpu_times()
                cpu = t.user + t.system + t.children_user + t.children_system
                r = seen[q.pid][0] if q.pid in seen else role(q)
                first = seen[q.pid][2] if q.pid in seen else time.perf_counter() - start
                seen[q.pid] = (r, cpu, first)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        time.sleep(a.every)
    wall = time.perf_counter() - start
    by_role: dict[str, list[float]] = collections.defaultdict(list)
    for r, cpu, _ in seen.values():
        by_role[r].append(cpu)
    total = sum(c for _, c, _ in seen.values())
    print(f"exit {proc.returncode}, wall {wall:.1f} s, CPU seen {total:.1f} s ({total / wall:.2f} cores)")
    print(f"{'role':40s} {'procs':>5s} {'cpu s':>8s} {'per proc':>9s}")
    for r, cpus in sorted(by_role.items(), key=lambda kv: -sum(kv[1])):
        print(f"{r[:40]:40s} {len(cpus):5d} {sum(cpus):8.1f} {sum(cpus) / len(cpus):9.1f}")
    print("\nfirst seen (s after start):")
    for pid, (r, cpu, first) in sorted(seen.items(), key=lambda kv: kv[1][2]):
        if cpu >= 0.5:
            print(f"  {first:6.1f}  {r[:40]:40s} {cpu:6.1f} s")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()

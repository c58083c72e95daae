"""Run a module and print, at exit, the CPU time (time.thread_time: user+sys of that thread alone) its threads
used, summed by thread kind (the name up to its first '-' after 'comfybatch-', or the name itself), without a
profiler's overhead: `python bench/thread_cpu.py -m core worker --until-idle` (bench/fleet.py --thread-cpu)."""

from __future__ import annotations

import re
import resource
import runpy
import sys
import threading
import time
from collections import Counter
from typing import Any

flag, module, *rest = sys.argv[1:]
assert flag == "-m", "usage: thread_cpu.py -m MODULE [ARGS...]"
sys.argv = [module, *rest]
spent: Counter[str] = Counter()
lock = threading.Lock()
thread_run = threading.Thread.run


def kind(name: str) -> str:
    match = re.match(r"comfybatch-([a-z]+)", name)
    return match.group(1) if match else re.sub(r"[-_ ]?\d+.*$", "", name) or name


def switches() -> int:
    """This thread's voluntary context switches so far (Linux)."""
    try:
        with open("/proc/thread-self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("voluntary_ctxt_switches"))
    except (OSError, StopIteration):
        return 0


def timed_run(self: threading.Thread, *args: Any) -> None:
    try:
        thread_run(self)
    finally:
        with lock:
            spent[kind(self.name)] += time.thread_time()
            spent[kind(self.name) + "_switches_k"] += switches() / 1000


threading.Thread.run = timed_run  # type: ignore[method-assign]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    spent["main"] += time.thread_time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    spent["voluntary_switches_k"] = usage.ru_nvcsw / 1000  # so fleet.py prints switches per job
    spent["forced_switches_k"] = usage.ru_nivcsw / 1000
    print("THREAD-CPU " + " ".join(f"{k}={v:.3f}" for k, v in spent.most_common()), file=sys.stderr, flush=True)

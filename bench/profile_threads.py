"""Run a module under cProfile in EVERY thread (cProfile alone sees only the main thread), timing each thread's own
CPU (time.thread_time: waiting on the GIL or a socket is not counted), and write the merged
statistics: `python bench/profile_threads.py OUT -m core worker --until-idle` (bench/fleet.py --profile)."""

from __future__ import annotations

import cProfile
import pstats
import runpy
import sys
import threading
import time
from typing import Any

out, flag, module, *rest = sys.argv[1:]
assert flag == "-m", "usage: profile_threads.py OUT -m MODULE [ARGS...]"
sys.argv = [module, *rest]
profiles: list[cProfile.Profile] = []
thread_run = threading.Thread.run


def profiled_run(self: threading.Thread, *args: Any) -> None:
    profile = cProfile.Profile(time.thread_time)
    profiles.append(profile)
    profile.enable()
    try:
        thread_run(self)
    finally:
        profile.disable()


threading.Thread.run = profiled_run  # type: ignore[method-assign]
main = cProfile.Profile(time.thread_time)
profiles.append(main)
main.enable()
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    main.disable()
    pstats.Stats(*profiles).dump_stats(out)

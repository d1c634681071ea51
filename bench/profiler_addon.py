"""pyinstrument around mitmdump's event loop, switched on and off by SIGUSR1: the script
`bench.profile` loads beside the proxy's own, so that only the calls after its warm-up are
profiled. On the second SIGUSR1 the session goes to the file named by
`LLM_MITM_BENCH_PROFILE` and the profiler is ready for the next one."""

from __future__ import annotations

import asyncio
import os
import signal

from pyinstrument import Profiler

INTERVAL_S = 0.0005  # pyinstrument's default (1 ms) leaves too few samples of a ~2 ms request


class ProfileOnSignal:
    def __init__(self) -> None:
        self.profiler: Profiler | None = None

    def running(self) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.toggle)

    def toggle(self) -> None:
        if self.profiler is None:
            self.profiler = Profiler(interval=INTERVAL_S, async_mode="disabled")  # the whole loop, not one task
            self.profiler.start()
            return
        session = self.profiler.stop()
        self.profiler = None
        path = os.environ["LLM_MITM_BENCH_PROFILE"]
        session.save(path + ".part")
        os.replace(path + ".part", path)  # whole, or not there yet


addons = [ProfileOnSignal()]

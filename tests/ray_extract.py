"""``scripts/extract.py`` whose Ray tasks are slowed and whose driver can pause:
``python tests/ray_extract.py DELAY_S PAUSE_AFTER ARGS...`` (PAUSE_AFTER 0: never).

The cluster tests of ``test_ray.py`` start it. Each Ray task sleeps ``DELAY_S`` before its batch, so
that a node can be killed under running tasks; the task function is defined here, in ``__main__``,
so Ray ships it by value to every worker and calls the real ``engine_ray.run_batch`` there. After
the driver has collected ``PAUSE_AFTER`` batches it prints ``CNNCODES_PAUSED K`` and sleeps, and
the test SIGKILLs it. Production code holds no such hook (as ``tests/pausing_extract.py``).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnncodes import engine_ray  # noqa: E402
from cnncodes.cli_extract import main  # noqa: E402

DELAY_S = float(sys.argv.pop(1))
PAUSE_AFTER = int(sys.argv.pop(1))


def slow_run_batch(*args):
    time.sleep(DELAY_S)  # keeps tasks running long enough to kill a node under them
    return engine_ray.run_batch(*args)  # on the worker: the module as installed, not this patch


_run = engine_ray.run


def pausing_run(address, ts, work, on_batch):
    n_done = 0

    def on(br):
        nonlocal n_done
        on_batch(br)
        n_done += 1
        if n_done == PAUSE_AFTER:
            print(f"CNNCODES_PAUSED {n_done}", flush=True)
            time.sleep(3600)  # the test kills the driver here

    return _run(address, ts, work, on)


if __name__ == "__main__":
    engine_ray.run = pausing_run
    engine_ray.run_batch = slow_run_batch
    sys.exit(main(sys.argv[1:]))

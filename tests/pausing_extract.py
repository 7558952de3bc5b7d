"""``scripts/extract.py`` that stops after its K-th shard: ``python tests/pausing_extract.py K ARGS...``.

The kill tests of ``test_robustness.py`` start it, read ``CNNCODES_PAUSED K`` from its stdout and SIGKILL
it while it waits: the shard writer of this process is replaced by one that prints the line and sleeps
after writing its K-th shard. Production code holds no such hook.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnncodes.cli_extract import main  # noqa: E402
from cnncodes.extraction import _jobs  # noqa: E402
from cnncodes.workdir import _ShardWriter  # noqa: E402

PAUSE_AFTER = int(sys.argv.pop(1))


class _PausingWriter(_ShardWriter):
    def write(self, item) -> None:
        super().write(item)
        if self.written == PAUSE_AFTER:
            print(f"CNNCODES_PAUSED {self.written}", flush=True)
            time.sleep(3600)  # the test kills the process here


_jobs._ShardWriter = _PausingWriter

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

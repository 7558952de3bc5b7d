"""``scripts/finetune.py`` that stops after its K-th epoch: ``python tests/pausing_finetune.py K ARGS...``.

The kill test of ``test_finetune.py`` starts it, reads ``CNNCODES_PAUSED K`` from its stdout and SIGKILLs
it while it waits: the epoch loop of this process is wrapped so that, once epoch K is checkpointed, it
prints the line and sleeps. Production code holds no such hook (as ``tests/pausing_extract.py``).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnncodes.cli_finetune import main  # noqa: E402
from cnncodes.finetune import loop  # noqa: E402

PAUSE_AFTER = int(sys.argv.pop(1))

_train_epochs = loop.train_epochs


def pausing_train_epochs(**kw):
    def on_epoch(rec):
        if rec["epoch"] == PAUSE_AFTER:  # train_epochs calls this after the epoch's checkpoint is saved
            print(f"CNNCODES_PAUSED {rec['epoch']}", flush=True)
            time.sleep(3600)  # the test kills the process here

    assert kw.pop("on_epoch", None) is None, "the orchestrator now passes its own on_epoch: chain the two"
    return _train_epochs(**kw, on_epoch=on_epoch)


if __name__ == "__main__":
    loop.train_epochs = pausing_train_epochs  # orchestrate imports it from the module at call time
    sys.exit(main(sys.argv[1:]))

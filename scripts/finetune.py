#!/usr/bin/env python
"""Fine-tune a pretrained backbone, or train it from scratch, on labelled images. See ``--help``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnncodes.cli_finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

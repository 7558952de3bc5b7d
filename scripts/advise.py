#!/usr/bin/env python
"""Recommend a transfer-learning strategy and layer from one extraction. See ``--help``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnncodes.cli_advise import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

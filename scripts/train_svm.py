#!/usr/bin/env python
"""Train linear SVM and softmax classifiers on cached CNN codes. See ``--help``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnncodes.cli_train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

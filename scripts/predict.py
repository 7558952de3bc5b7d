#!/usr/bin/env python
"""Predict the class of new images with a trained run. See ``--help``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnncodes.cli_predict import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

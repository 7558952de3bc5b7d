#!/usr/bin/env python
"""Extract CNN codes into an HDF5 cache. See ``python scripts/extract.py --help``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnncodes.cli_extract import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

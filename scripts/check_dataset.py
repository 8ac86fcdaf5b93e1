#!/usr/bin/env python
"""Check a BBU dataset (all splits): see `python -m dinov2.data.check --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dinov2.data.check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

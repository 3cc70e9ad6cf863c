"""``python -m ds_fastckpt``: the operator command line."""

import sys

from .cli import main

sys.exit(main())

"""``python -m ds_fastckpt``: the operator command line."""

import sys

from ds_fastckpt.cli.main import main

sys.exit(main())

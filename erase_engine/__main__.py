"""``python -m erase_engine``: the ``erase-concept`` command."""

import sys

from .frontends.cli import main

sys.exit(main())

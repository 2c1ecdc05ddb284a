"""``python -m longhorn_zoo COMMAND ...``: the same as the ``longhorn-zoo`` command (see :mod:`longhorn_zoo.cli`)."""

import sys

from longhorn_zoo.cli import main

sys.exit(main())

"""``python -m jaxnet.app``: the ``jaxnet`` command."""

import sys

from jaxnet.app.cli import main

sys.exit(main())

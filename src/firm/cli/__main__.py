"""``python -m firm.cli``: the experiment harness starts its runs this way."""

import sys

from firm.cli import main

sys.exit(main())

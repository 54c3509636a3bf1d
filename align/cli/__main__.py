"""``python -m align.cli ...`` (and ``accelerate launch ... -m align.cli train RECIPE``)."""

import sys

from align.cli import main

sys.exit(main())

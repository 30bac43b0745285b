"""`python -m boxrefiner` is the `boxrefiner` command."""

import sys

from boxrefiner.cli.main import main

sys.exit(main())

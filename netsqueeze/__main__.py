"""`python -m netsqueeze ...`: the `netsqueeze` command."""

import sys

from netsqueeze.cli import main

sys.exit(main())

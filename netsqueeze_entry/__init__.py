"""The `netsqueeze` command's entry point.

It lives outside the `netsqueeze` package on purpose: importing anything under `netsqueeze` imports torch (a second
or more of the start-up), before `netsqueeze.cli.main` can catch a Ctrl-C. Here the import itself is guarded, so an
interrupt at any moment prints "interrupted" and exits 130, as one during a compile does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

EXIT_SIGINT = 130  # 128 + SIGINT, as `netsqueeze.cli` exits on an interrupt


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from netsqueeze.cli import main as run
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_SIGINT
    return run(argv)

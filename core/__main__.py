"""``python -m pagetrack``: the same command line as the ``pagetrack`` script."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main(prog_name="pagetrack")

"""`python -m harness ...`: the same as the `harness` command (useful where the console script is not on PATH)."""
import sys

from harness.cli import main

sys.exit(main())

"""`python -m loralab.cli ...`, the same as the `loralab` command."""
import sys

from loralab.cli import main

sys.exit(main())

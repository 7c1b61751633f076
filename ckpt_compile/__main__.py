"""``python -m ckpt_compile``: the command line (``ckpt_compile/cli/``)."""
import sys

from ckpt_compile.cli import main

sys.exit(main())

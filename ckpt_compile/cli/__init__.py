"""The command line, ``python -m ckpt_compile`` (``_main``), and its demo (``_demo``).

The top of the house: it may import every other part.
"""
from ckpt_compile.cli._main import main

__all__ = ["main"]

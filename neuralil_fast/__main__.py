import sys

from neuralil_fast.cli import entry

sys.exit(entry())

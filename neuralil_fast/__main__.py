import sys

from neuralil_fast.cli import main

sys.exit(main())

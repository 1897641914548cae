"""`python -m train ...` is `transflax ...`."""
import sys

from train.cli import main

sys.exit(main())

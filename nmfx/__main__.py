import sys

from nmfx.cli import main

sys.exit(main())

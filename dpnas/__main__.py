import sys

from dpnas.cli import main

sys.exit(main())

import sys

from ichscan.cli import main

sys.exit(main())

import sys

from misotts.cli import main

sys.exit(main())

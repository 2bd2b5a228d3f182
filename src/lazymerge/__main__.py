import sys

from lazymerge.cli import main

sys.exit(main())

import sys

from widedeep.cli import main

sys.exit(main())

import sys

from widedeep.cli import entry

sys.exit(entry())

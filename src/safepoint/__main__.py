import sys

from safepoint.cli import main

sys.exit(main())

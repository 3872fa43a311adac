import sys

from safepoint.powercut.fs import main

sys.exit(main(sys.argv[1:]))

import sys

from cake.cli import main

sys.exit(main())

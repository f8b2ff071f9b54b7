import sys

from latentforge.cli import main

sys.exit(main())

import sys

from ocixfs.cli import main

sys.exit(main())

import sys

from flora.app.cli import main

sys.exit(main())

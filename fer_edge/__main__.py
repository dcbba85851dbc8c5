import sys

from fer_edge.cli import main

sys.exit(main())

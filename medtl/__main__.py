"""`python -m medtl` is the `medtl` command."""
import sys

from medtl.cli import main

sys.exit(main())

import sys

from optqa.cli import main

sys.exit(main())

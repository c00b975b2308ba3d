import sys

from reward.cli import main

sys.exit(main())

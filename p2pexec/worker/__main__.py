import sys

from ..cli import worker_main

sys.exit(worker_main())

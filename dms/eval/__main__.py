"""`python -m dms.eval [lm-eval arguments]`: see `dms.eval.harness`."""

import sys

from dms.eval.harness import main

if __name__ == "__main__":
    sys.exit(main())

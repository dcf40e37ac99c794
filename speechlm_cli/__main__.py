"""`python -m speechlm_cli`: the `speechlm` command without the console script."""

import sys

from speechlm_cli import main

sys.exit(main())

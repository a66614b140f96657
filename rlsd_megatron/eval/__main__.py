"""``python -m rlsd_megatron.eval``: the ``rlsd-eval`` command."""

import sys

from rlsd_megatron.eval.cli import main

sys.exit(main())

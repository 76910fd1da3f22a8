"""``python -m finetune COMMAND ...``: the ``finetune`` command."""

import sys

from finetune.cli import main

sys.exit(main())

"""Entry point for launchers: ``accelerate launch -m finetune.run recipe=NAME [key=value ...]``
(or ``torchrun ... -m finetune.run``, or the file ``finetune/run.py`` in a checkout)."""

import sys

from finetune.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

"""Entry point for ``accelerate launch finetune/run.py recipe=NAME [key=value ...]``."""

import sys

from finetune.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

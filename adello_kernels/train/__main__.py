"""`python -m adello_kernels.train`: see adello_kernels/train/cli.py or `--help`."""
import sys

from .cli import main

sys.exit(main())

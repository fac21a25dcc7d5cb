"""`python run.py ...` is the `finetune` command, run from a checkout without installing the
package (see `python run.py --help`, and `finetune_module/cli.py`)."""

import sys

from finetune_module.cli import main

if __name__ == "__main__":
    sys.exit(main())

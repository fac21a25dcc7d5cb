"""`python -m finetune_module`: the `finetune` command (see `python -m finetune_module --help`)."""

import sys

from finetune_module.cli import main

sys.exit(main())

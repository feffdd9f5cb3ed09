"""`python -m aletheia_lora`: the same as the `aletheia-lora` command."""

import sys

from aletheia_lora.cli import main

sys.exit(main())

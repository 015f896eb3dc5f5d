"""``python -m hf_sae.remote_code OUT.py``: write the generated remote-code file, to read it."""

import sys

from . import main

sys.exit(main())

"""The self-contained modeling file that ``push_sae(..., include_code=True)`` uploads (see ``modeling_hf_sae.py``).

``modeling_hf_sae.py`` must import nothing from hf_sae: it runs where hf-sae is not installed.
"""

from pathlib import Path

REMOTE_CODE_FILE = Path(__file__).with_name("modeling_hf_sae.py")

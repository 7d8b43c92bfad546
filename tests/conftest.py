"""The suite runs offline: nothing may be downloaded, and a name that is neither a local path nor a cached Hub id
fails at once. Online, huggingface_hub retries such a name for ~23 s (1+2+4+8+8 s) before it gives up.

Set before any test module imports huggingface_hub, which reads the variable once, at import.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

"""byolcli: train, embed and evaluate a BYOL image encoder on a folder of images.

Importing the package is cheap (no torch); the Python API is loaded on first use.
"""

from typing import Any

__version__ = "0.1.0"

# (`scan` is not here: byolcli.scan is also the module's name; use byolcli.scan.scan.)
_LAZY = {"load_encoder": "byolcli.encoder", "save_encoder": "byolcli.encoder", "embed_folder": "byolcli.embed"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'byolcli' has no attribute {name!r}")

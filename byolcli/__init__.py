"""byolcli: train, embed and evaluate a BYOL image encoder on a folder of images.

The package is a core and three wings. `core/` is what every command stands on: the folder scan, files
and locks, images and pixels, the hardware, the networks and their weights, embedding, the terminal.
`training/` plans and runs `byol train`; `evaluation/` judges encoders, with labels and without;
`vectors/` answers questions of a folder's vectors (similar, duplicates, groups, select). `cli.py` only
parses flags and calls into them. Each subpackage's docstring says what it may import.

Importing the package is cheap (no torch); the Python API is loaded on first use.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_encoder": "byolcli.core.encoder",
    "save_encoder": "byolcli.core.encoder",
    "embed_folder": "byolcli.core.embed",
    "scan": "byolcli.core.scan",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'byolcli' has no attribute {name!r}")

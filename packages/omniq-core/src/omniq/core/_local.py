"""Deprecated module name: ``LocalOps`` lives in ``omniq.core._local_ops``. Kept only for
``benchmarks/requests.py`` until it imports the new name."""

from ._local_ops import LocalOps as LocalOps

"""OmniQ benchmark suite: ``python benchmarks/run.py all|smoke|NAME`` (see benchmarks/README.md)."""

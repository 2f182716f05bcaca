"""Benchmarks shipped with the package: engine speed (``decode.py``), used by ``quantdeploy bench``."""

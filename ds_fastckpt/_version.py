"""The version of ds_fastckpt: read by setup.py, the package and the manifests it writes."""

__version__ = "0.1.0"

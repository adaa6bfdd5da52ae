"""The version of lte (one source: `lte.__version__`, the package metadata and the save files read it)."""

__version__ = "0.1.0"

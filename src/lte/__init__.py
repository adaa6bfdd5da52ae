"""lte: Learn To be Efficient."""
__version__ = "0.1.0"

"""CartridgeOCR: detect casing and primer in headstamp photos, unroll the ring, read the text."""

__version__ = "0.1.0"

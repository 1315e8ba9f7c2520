"""GGUF model files: Ember's own validated, memory-mapped reader."""
from ember.gguf.reader import GGUFFile, TensorInfo, open_gguf

__all__ = ["GGUFFile", "TensorInfo", "open_gguf"]

"""Helpers every layer shares, below ``cache``: they import nothing of the project.

- ``atomic``: write a file through a temporary file renamed over it (a reader never sees half a file).
- ``statedict``: how a state dict differs from the one a model expects (missing, unexpected, mis-shaped keys).
"""

"""What every layer shares, below ``cache``; nothing here imports the project's other packages.

- ``atomic``: write a file through a temporary file renamed over it (a reader never sees half a file).
- ``errors``: ``OptionError``, an argument with a bad value, named by its keyword (the CLI names its flag).
- ``devices``: the device (auto, cpu, cuda, cuda:N) and precision (fp32, bf16, fp16) a stage runs on, full
  float32, deterministic kernels, malloc tuning, device syncs.
- ``progress``: the one progress display (a bar in a terminal, plain lines in a log).
- ``options``: ``option_field``, a config dataclass field carrying its option's help.
- ``statedict``: how a state dict differs from the one a model expects (missing, unexpected, mis-shaped keys).
"""

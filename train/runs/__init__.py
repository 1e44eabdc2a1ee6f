"""Run and model folders, and what loads them.

- ``rundir``: a run folder's file names, reading and writing them (atomic, named errors), "finished", "evaluated".
- ``resume``: a fit's checkpoint, continuing it, and whether a finished run may be reused.
- ``modeldir``: an exported model folder (config.json, model.safetensors, card) and :class:`StageOne`.
- ``stage_one``: the UNet and text encoder that made a run's features, checked against their recorded hashes.
- ``loading``: a finished run's (or model folder's) model, through the registry.
"""

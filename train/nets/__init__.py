"""The networks stage two trains: pure modules (no store, no files).

- ``head``: the TextDiff head (:class:`TextDiffHead`: per-scale cross-attention, the conv classifier).
- ``fastconv``: the head's exact fast first convolution (upsampling folded into matmuls).
- ``plain_unet``: the plain U-Net baseline (:class:`PlainUNet`).
- ``losses``: CE + 1.5 Dice, the authors' loss.
"""

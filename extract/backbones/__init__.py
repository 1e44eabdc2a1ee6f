"""Diffusion backbones stage one can hook: ADM (``adm``), diffusers (``hf_diffusers``) and MONAI (``monai_unet``),
behind one interface (``base.Backbone``); where ``--unet`` points is resolved by :mod:`extract.checkpoints`."""

from extract.backbones.adm import AdmBackbone, as_backbone
from extract.backbones.base import Backbone, block_table, decoder_units, unit_tensor

__all__ = ["AdmBackbone", "Backbone", "as_backbone", "block_table", "decoder_units", "unit_tensor"]

"""What stage one takes: :class:`ExtractConfig` (extract) and :class:`PretrainConfig` (pretrain), their
defaults and each option's help (``pipeline extract`` / ``pipeline pretrain`` take both from here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache.key import default_cache_dir
from common.options import option_field

DEFAULT_STEPS = (50, 150, 250)
DEFAULT_SEED = 40  # the authors' seed for the one shared noise tensor (extract.diffusion.shared_noise)
AUGMENTATIONS = {"none": 1, "d4": 8}
STORE_DTYPE = "float16"
#: ExtractConfig fields a store does not record in its ``extract`` attribute: which pairs, where, and how the run
#: was carried out (its forward batch is recorded as ``forward_batch``); every other field is recorded
RUN_OPTIONS = ("steps", "blocks", "cache_dir", "batch_size", "device", "scheduler", "threads")
#: the help of every stage's ``device`` option (the names common.devices.resolve_device takes)
DEVICE_HELP = "auto (CUDA when present; the default), cpu, cuda or cuda:N."


@dataclass
class ExtractConfig:
    """Everything ``pipeline extract`` takes (defaults: the paper's); ``run_extract`` runs it."""

    dataset: str = option_field(help="monuseg, qata, folder or synthetic.")
    data_root: Path | None = option_field(None, "The dataset's folder (not needed for synthetic).")
    unet: str = option_field(
        "adm-imagenet-256", "Preset name, a `pipeline pretrain` folder, a state_dict file, or a diffusers pipeline / "
                            "UNet folder or Hub id.")
    unet_flags: Path | None = option_field(
        None, "guided-diffusion create_model flags (JSON) for a state_dict file; or MONAI DiffusionModelUNet "
              "arguments ({\"_class_name\": \"DiffusionModelUNet\", ...}).")
    unet_condition: str = option_field(
        "empty", "A conditional diffusers UNet's prompt: empty, or text (each image's own text).")
    text_encoder: str = option_field(
        "bioclinicalbert", "bioclinicalbert, minilm (offline), or a local HF model folder.")
    steps: tuple[int, ...] = option_field(DEFAULT_STEPS, "Diffusion steps t.")
    blocks: tuple[int, ...] | None = option_field(
        None, "UNet output_blocks to keep (default: the paper's for the dataset).")
    size: int = option_field(256, "Images are resized to size x size.")
    seed: int = option_field(
        DEFAULT_SEED, "Seed of the one noise tensor shared by all images and steps (authors: 40).")
    splits: tuple[str, ...] | None = option_field(None, "Comma-separated splits to extract (default: all).")
    augment: str = option_field("none", "none, or d4: also store the 8 dihedral views of training images.")
    tta_views: str = option_field(
        "none", "none, or d4: also store the 8 dihedral views of the val and test images, each with its own text "
                "(test-time augmentation: evaluate / predict --tta; made on demand when first needed).")
    max_length: int | None = option_field(
        None, "Text tokens kept (default: the longest text); authors: 10.")
    cache_dir: Path | str = option_field(  # a folder, or an fsspec URL
        help="Where stores live: a folder or an fsspec URL (s3://bucket/cache, zarr only) (default: "
             "$TEXTDIFF_CACHE_DIR or ~/.cache/textdiff).", default_factory=default_cache_dir)
    batch_size: int = option_field(12, "UNet samples (images x views x steps) per forward pass.")
    device: str | None = option_field(None, DEVICE_HELP)
    autocast: bool = option_field(False, "Mixed precision: bf16 on CPU, fp16 on GPU.")
    color_order: str = option_field("rgb", "rgb, or bgr like the authors' OpenCV loader.")
    skip_bad: bool = option_field(
        False, "Skip items with a missing mask/text/image instead of failing (reported).")
    limit: int | None = option_field(None, "Only the first N images of each split (quick trials).")
    scheduler: str | None = option_field(  # None: this process
        None, "Run on dask.distributed: local:N (N worker processes here) or tcp://HOST:PORT (a running "
              "cluster sharing the filesystem).")
    threads: int | None = option_field(  # None: torch's default here
        None, "Torch threads per process and per worker (default: torch's); results are bit-identical at equal counts.")
    store_format: str = option_field(
        "zarr", "zarr (a folder; many writers, --scheduler) or h5 (one HDF5 file; one writer).")
    dataset_options: dict[str, Any] = option_field(
        help="Options of the dataset's reader (qata: layout; synthetic: seed, counts, native_size).",
        default_factory=dict)


@dataclass
class PretrainConfig:
    """Everything ``pipeline pretrain`` takes; :func:`pretrain` runs it."""

    dataset: str = option_field(help="monuseg, qata, folder or synthetic: its images only, never masks.")
    out: Path = option_field(help="Folder for model.pt, flags.json, train_log.csv, samples.png.")
    data_root: Path | None = option_field(None, "The dataset's folder (not needed for synthetic).")
    splits: tuple[str, ...] = option_field(
        ("train",), "Splits whose images are used (the test split only if you ask).")
    size: int = option_field(64, "Images are resized to size x size, as extraction does.")
    crop: int | None = option_field(
        None, "Train on random crop x crop windows of the resized images (extract still at --size).")
    flags: str = option_field(
        "cpu-64", "A preset (cpu-64: minutes on a CPU; gpu-256: about an hour on a GPU) or a JSON file of "
                  "create_model flags.")
    iterations: int = option_field(2000, "Training iterations.")
    batch_size: int = option_field(16, "Images per iteration.")
    lr: float = option_field(1e-4, "AdamW learning rate.")
    ema: float = option_field(0.9999, "EMA rate of the saved weights (with warm-up).")
    seed: int = option_field(0, "Seed of the weights, batches, noise and timesteps.")
    resume: bool = option_field(False, "Continue the run in --out from its last checkpoint.")
    device: str | None = option_field(None, DEVICE_HELP)
    samples: int = option_field(16, "Images in samples.png (0: none drawn, e.g. for an untrained UNet).")
    sample_steps: int = option_field(50, "Respaced ancestral sampling steps for samples.png.")
    checkpoint_every: int = option_field(100, "Iterations between checkpoints (state.pt, model.pt).")
    dataset_options: dict[str, Any] = option_field(
        help="Options of the dataset's reader (qata: layout; synthetic: seed, counts, native_size).",
        default_factory=dict)

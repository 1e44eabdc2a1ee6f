"""What the train commands take, as dataclasses (no torch: the CLI reads their defaults and help).

A fit takes the training options, and the model with its own constructor arguments.

``FitConfig(cache, out, model="textdiff", model_args=TextDiffArgs(dim=64))`` or
``FitConfig(cache, out, model="plain-unet", model_args=PlainUNetArgs(width=32))`` (or, flat,
``FitConfig.flat(cache=..., out=..., model="plain-unet", width=32)``); the field
``metadata["help"]`` is what the CLI shows. In a run's ``config.json`` the config is flat, as it
always was (:meth:`FitConfig.to_json`: the training options, ``model``, and every registered model's
arguments, the chosen one's values, the others at their defaults); :meth:`FitConfig.from_json`
reads that layout, older ones included (``"model": "unet"``, missing newer options).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cache.schema import MASK_RESIZES
from common.errors import OptionError
from extract.config import DEVICE_HELP
from common.options import option_field

__all__ = ["ALIASES", "COMMAND_MODEL", "COMMAND_OPTIONS", "MEMORY_BUDGET_GB", "SWITCHES", "Switch", "ZERO_IS_NONE",
           "flat_from_options", "option_default", "option_home", "DROPOUT_CLASSIFIERS", "DemoConfig", "EvaluateConfig", "ExportConfig", "PredictConfig", "FUSIONS", "FitConfig", "MASK_RESIZES", "MODEL_ARGS",
           "NORMS", "PRECISION_NAMES", "PlainUNetArgs", "TextDiffArgs", "TEXT_MODES", "VIEW_TEXTS", "check_range",
           "model_name"]

FUSIONS = ("cross-attn", "concat", "none")
#: how many GB of a split's features a fit holds in memory before it streams them (the one default)
MEMORY_BUDGET_GB = 4.0
NORMS = ("image", "batch")
#: the views test-time augmentation averages over (:func:`extract.shared.dihedral`'s numbering): the 4
#: mirrorings (identity, rot180 = both flips, horizontal flip, vertical flip) or all 8 dihedral views
TTA_VIEWS: dict[str, tuple[int, ...]] = {"none": (0,), "flips": (0, 2, 4, 6), "d4": tuple(range(8))}
TTA_HELP = ("Test-time augmentation: none, flips (the 4 mirrorings) or d4 (the 8 dihedral views): the mean "
            "probability over the views, each mapped back; a view reads its own rewritten text.")
VIEW_TEXTS = ("same", "rewrite", "unchanged")  # what text a cached view is trained with (FitConfig.view_text)
#: what the samples whose text is withheld train (FitConfig.dropout_classifier)
DROPOUT_CLASSIFIERS = ("shared", "own")
#: the text an evaluation gives the head (:mod:`train.textmodes`)
TEXT_MODES = ("as-is", "none", "shuffled", "mirrored")
#: the names of :data:`common.devices.PRECISIONS` (no torch here): what ``precision`` takes
PRECISION_NAMES = ("fp32", "bf16", "fp16")


def check_range(owner: Any, name: str, low: float, high: float = math.inf, *, above: bool = False,
                below: bool = True) -> None:
    """Refuse ``owner.<name>`` unless None or a finite number from ``low`` (excluded with ``above``) to ``high``
    (excluded with ``below``): an :class:`OptionError` naming the keyword."""
    value = getattr(owner, name)
    if value is None or (math.isfinite(value) and (value > low if above else value >= low)
                         and (value < high if below else value <= high)):
        return
    span = (f"{'>' if above else '>='} {low:g}" if high == math.inf
            else f"in {'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}")
    verb = "be a finite number" if not math.isfinite(value) else "be" if high == math.inf else "lie"
    raise OptionError(f"{name} must {verb} {span}, got {value}", name)


def check_choice(owner: Any, name: str, choices: tuple[str, ...]) -> None:
    """Refuse ``owner.<name>`` unless one of ``choices`` (an :class:`OptionError` naming the keyword)."""
    value = getattr(owner, name)
    if value not in choices:
        raise OptionError(f"{name} must be one of {list(choices)}, got {value!r}", name)


@dataclass(frozen=True)
class TextDiffArgs:
    """The TextDiff head's arguments a fit chooses (``FitConfig.model_args`` of a ``textdiff`` fit);
    ``in_channels`` and ``text_dim`` come from the store."""

    dim: int = field(default=768, metadata={"help": "Width of the projections and the transformer block."})
    head_channels: tuple[int, ...] = field(default=(128, 32), metadata={"help": "Hidden widths of the conv classifier."})
    fusion: str = field(default="cross-attn", metadata={
        "help": "cross-attn (paper) or concat (ablation ζ2)."})  # "none": no text (ablation ζ1)
    norm: str = field(default="image", metadata={
        "help": "image: the classifier normalises with each image's statistics, in training and evaluation; "
                "batch: BatchNorm running statistics at evaluation (authors)."})
    pos_enc: bool = field(default=False, metadata={"help": "Add a 2-D sinusoidal position code to the queries."})
    shared_block: bool = field(default=True, metadata={
        "help": "One transformer block shared by all scales (False: one per scale)."})
    text_gate: bool = field(default=False, metadata={
        "help": "Gate each text block's branches by tanh(100·α), α learnt from 0: the head starts as ζ1 (no text) "
                "and takes the text in as far as training opens the gates (authors: ungated)."})

    def __post_init__(self) -> None:
        check_choice(self, "fusion", FUSIONS)
        check_choice(self, "norm", NORMS)
        object.__setattr__(self, "head_channels", tuple(int(c) for c in self.head_channels))
        check_range(self, "dim", 1)
        if any(c < 1 for c in self.head_channels):
            raise OptionError(f"head_channels must be >= 1 each, got {list(self.head_channels)}", "head_channels")
        if self.pos_enc and self.dim % 4:
            raise OptionError(f"dim must be divisible by 4 with pos_enc=True (the 2-D position code), got {self.dim}",
                              "dim", "pos_enc")
        if self.text_gate and self.fusion != "cross-attn":
            raise OptionError(f"text_gate gates the cross-attention: it needs fusion cross-attn, got {self.fusion!r}",
                              "text_gate", "fusion")


@dataclass(frozen=True)
class PlainUNetArgs:
    """The plain U-Net's constructor arguments (``FitConfig.model_args`` of a ``plain-unet`` fit)."""

    width: int = field(default=64, metadata={"help": "Channels of the first level (64: the classic 31.0 M-parameter U-Net)."})
    depth: int = field(default=4, metadata={"help": "Down-sampling levels (the size must be divisible by 2^depth)."})

    def __post_init__(self) -> None:
        check_range(self, "width", 1)
        check_range(self, "depth", 1)


#: each registered model's constructor-argument dataclass (:data:`train.registry.MODELS` builds on it)
MODEL_ARGS: dict[str, type] = {"textdiff": TextDiffArgs, "plain-unet": PlainUNetArgs}
#: older names of models (a config.json written before the rename)
ALIASES = {"unet": "plain-unet"}


def model_name(name: str) -> str:
    """The registered name of model ``name`` (or of its older alias)."""
    name = ALIASES.get(name, name)
    if name not in MODEL_ARGS:
        raise ValueError(f"model must be one of {list(MODEL_ARGS)}, got {name!r}")
    return name


@dataclass(frozen=True)
class DemoConfig:
    """What ``pipeline demo`` takes."""

    out: Path = field(default=Path("runs/demo"), metadata={"help": "Where the demo writes everything (rerun to resume)."})
    iterations: int = field(default=300, metadata={"help": "Diffusion pretraining iterations (batch 8)."})
    epochs: int = field(default=25, metadata={"help": "Epochs of each fit."})



@dataclass(frozen=True)
class EvaluateConfig:
    """What ``pipeline evaluate`` takes besides the run (:func:`train.evaluate.evaluate`'s defaults)."""

    split: str = option_field("test", "The store split to score.")
    cache: str | None = option_field(None, "The run's store, if it moved (default: the one the run recorded); "
                                           "a store with another key is refused.")
    overlays: bool = option_field(True, "Also write eval-<split>/overlays/<id>.png (image | ground truth | "
                                        "prediction).")
    device: str | None = option_field(None, DEVICE_HELP)
    precision: str = option_field("fp32", "fp32, or bf16 / fp16 autocast for the forward passes.")
    text: str = option_field("as-is", "The text the head is given: as-is, none, shuffled or mirrored (written to "
                                      "eval-<split>-text-<mode>/).")
    text_seed: int = option_field(0, "Seed of --text shuffled (which image gets which other image's text).")
    text_encoder: str | None = option_field(None, "With --text mirrored: the store's text encoder, if it moved "
                                                  "(its hashes are checked).")
    tta: str = option_field("none", TTA_HELP + " Written to eval-<split>[-text-<mode>]-tta-<views>/; the val / "
                                               "test views' features are extracted into the store's TTA companion "
                                               "on first need.")

    def __post_init__(self) -> None:
        check_choice(self, "precision", PRECISION_NAMES)
        check_range(self, "text_seed", 0)
        check_choice(self, "tta", tuple(TTA_VIEWS))


@dataclass(frozen=True)
class PredictConfig:
    """What ``pipeline predict`` takes besides the run: one image (``image``, :func:`train.inference.predictor.predict`) or
    many (``images``, :func:`train.inference.batch.predict_batch`)."""

    out: Path = option_field(help="With --image: the mask PNG to write ({0,255}), or a folder → <image stem>_mask.png. "
                                  "With --images: the folder of masks and predictions.csv.")
    image: Path | None = option_field(None, "The image to segment (PNG, JPEG, TIFF, BMP; grey, RGB, 16-bit).")
    images: Path | None = option_field(None, "Many images: a folder (its image files), or a .csv/.xlsx table with "
                                             "a column image (paths relative to the table's folder).")
    text: str = option_field("", "With --image: its description; empty: no text (every token withheld, as evaluate "
                                 "--text none).")
    texts: Path | None = option_field(None, "With --images: a .csv/.xlsx table of columns image, text; an image "
                                            "without a row, or with an empty text, has no text.")
    cache: str | None = option_field(None, "The run's store, if it moved (default: the one the run recorded).")
    original_size: bool = option_field(False, "Resize the mask (nearest) and probabilities (bilinear) back to the "
                                              "image's size.")
    probabilities: bool = option_field(False, "With --images: also write <stem>_prob.npy, the foreground "
                                              "probability (float16).")
    skip_bad: bool = option_field(False, "With --images: a missing or unreadable image is named and skipped, "
                                         "the rest go on (listed in predictions.csv).")
    unet: str | None = option_field(None, "The run's UNet checkpoint, if it moved, or a model folder's, if it is "
                                          "neither beside its config.json nor in the models folder (its sha256 is "
                                          "checked).")
    text_encoder: str | None = option_field(None, "The run's text encoder, if it moved (its hashes are checked).")
    device: str | None = option_field(None, DEVICE_HELP)
    precision: str = option_field("fp32", "fp32, or bf16 / fp16 autocast for the head's forward pass.")
    tta: str = option_field("none", TTA_HELP)

    def __post_init__(self) -> None:
        check_choice(self, "precision", PRECISION_NAMES)
        check_choice(self, "tta", tuple(TTA_VIEWS))


@dataclass(frozen=True)
class ExportConfig:
    """What ``pipeline export`` takes besides the run (:func:`train.export.export_run`)."""

    out: Path = option_field(help="The model folder to write (config.json, model.safetensors, README.md).")
    cache: str | None = option_field(None, "The run's store, if it moved (default: the one the run recorded).")
    push: str | None = option_field(None, "Also upload the folder to this Hugging Face Hub model repository "
                                          "(OWNER/NAME; created if need be; needs a network and a token).")


_TUPLES = ("blocks", "steps", "head_channels")  # JSON lists read back as tuples
_HOW = ("model_args", "resume", "overwrite", "device")  # not in the flat layout (model_args is flattened)


@dataclass
class FitConfig:
    """Everything a fit takes (defaults: the paper's)."""

    cache: Path = field(metadata={"help": "A store written by `pipeline extract` (a path or an fsspec URL)."})
    out: Path = field(metadata={"help": "The run folder to write."})
    model: str = option_field("textdiff", "The model: textdiff (the TextDiff head) or plain-unet (the baseline).")
    model_args: Any = option_field(None, "The model's own arguments (TextDiffArgs, PlainUNetArgs); None: its defaults.")
    blocks: tuple[int, ...] | None = option_field(None, "Blocks to use (default: all in the store).")
    steps: tuple[int, ...] | None = option_field(None, "Steps to use (default: all in the store).")
    train_count: int | None = option_field(None, "Few-shot training images (default: 5 MoNuSeg, 150 QaTa, else all).")
    subset_seed: int = option_field(0, "Seed of the few-shot subset (the chosen ids are recorded; the same for every model).")
    epochs: int = option_field(100, "Epochs (paper: 100; authors' code: 50).")
    batch_size: int = option_field(1, "Images per step (paper: 1).")
    lr: float = option_field(1e-4, "Adam learning rate.")
    lr_drop_epoch: int | None = option_field(60, "Multiply the learning rate by 0.1 after this epoch (authors: 60; 0 = never).")
    dice_on_logits: bool = option_field(False, "Feed raw logits to the Dice loss, as the authors' code does.")
    attend_padding: bool = option_field(False, "Let the cross-attention attend to padding tokens, as the authors' code does.")
    text_dropout: float = option_field(0.0, "Withhold a training sample's whole text with this probability, in [0, 1); "
                                            "0 = never (the paper).")
    dropout_classifier: str = option_field(
        "shared", "With --text-dropout, what the text-less samples train: shared (the text head) or own (a classifier "
                  "of their own).")
    seed: int | None = option_field(None, "Seed of the weights, order and augmentation (default: the subset seed).")
    mask_resize: str = option_field(
        "nearest", "The masks it trains, validates and is scored on: nearest (the annotation's boundary) or authors "
                   "(bilinear then > 0 like the authors' cv2.resize, which dilates every object); a store holds both.")
    val_fraction: float = option_field(0.2, "Hold-out of train for validation when the store has no val split.")
    memory_budget_gb: float = option_field(MEMORY_BUDGET_GB, "Hold features in memory up to this size (GB), else "
                                                             "stream them.")
    augment: bool = option_field(True, "Sample the cached dihedral views (p = 0.5 the original, else one of 8).")
    view_text: str = option_field(
        "same", "The text a cached view trains with: same (the image's), rewrite (the view's own) or unchanged (only "
                "views whose own text is the image's); the last two need a d4 store.")
    val_every: int = option_field(1, "Validate every K epochs (and after the last); the authors: every epoch.")
    device: str | None = option_field(None, DEVICE_HELP)
    precision: str = option_field("fp32", "fp32, or bf16 / fp16 autocast (mixed precision) for training and "
                                          "validation; recorded in config.json.")
    resume: bool = option_field(False, "Continue a killed fit from its last epoch's checkpoint (the same settings "
                                       "and store only); a finished fit is left as it is.")
    overwrite: bool = option_field(False, "Fit afresh into a folder that holds a finished (or unfinished) run: its "
                                          "evaluations (eval-*) and checkpoint are removed first.")
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "Free-form notes kept in config.json."})

    def __post_init__(self) -> None:
        self.model = model_name(self.model)
        args = MODEL_ARGS[self.model]
        if self.model_args is None:
            self.model_args = args()
        elif not isinstance(self.model_args, args):
            raise ValueError(f"model {self.model!r} takes {args.__name__}, got {type(self.model_args).__name__}")
        self._check_numbers()
        check_choice(self, "view_text", VIEW_TEXTS)
        check_choice(self, "dropout_classifier", DROPOUT_CLASSIFIERS)
        check_choice(self, "precision", PRECISION_NAMES)
        check_choice(self, "mask_resize", MASK_RESIZES)
        if self.resume and self.overwrite:
            raise OptionError("resume=True and overwrite=True exclude each other: continue the run, or fit it "
                              "afresh", "resume", "overwrite")

    def _check_numbers(self) -> None:
        """Refuse a number out of its range, or not finite (an :class:`OptionError` naming it), before a fit
        reads or writes anything."""
        for name in ("epochs", "batch_size", "val_every", "train_count"):
            check_range(self, name, 1)
        for name in ("subset_seed", "seed", "lr_drop_epoch", "memory_budget_gb"):  # lr_drop_epoch 0: never
            check_range(self, name, 0)
        check_range(self, "lr", 0, above=True)
        check_range(self, "text_dropout", 0, 1)
        check_range(self, "val_fraction", 0, 1, above=True)

    def to_json(self) -> dict[str, Any]:
        """The flat layout of ``config.json``'s ``fit`` entry (not ``resume``, ``overwrite`` and ``device``: how the
        fit ran, not what it is; the device used is recorded beside it)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _HOW}
        d["cache"], d["out"] = str(self.cache), str(self.out)
        for name, args in MODEL_ARGS.items():
            d.update(asdict(self.model_args if name == self.model else args()))
        return json.loads(json.dumps(d))

    def differences(self, recorded: dict[str, Any]) -> list[str]:
        """How this config's settings differ from ``recorded`` (a run's ``config.json`` ``fit`` entry, read as
        today's config reads it): ``"key: VALUE there, VALUE now"`` per key; where files are
        (cache, out) and the memory budget (streaming gives the same result) do not count."""
        def settings(fit_json: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in fit_json.items() if k not in ("cache", "out", "memory_budget_gb")}

        want = settings(self.to_json())
        have = settings(FitConfig.from_json({**recorded, "cache": self.cache, "out": self.out}).to_json())
        return [f"{k}: {have.get(k)!r} there, {want.get(k)!r} now"
                for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]

    @classmethod
    def flat_keys(cls, model: str = "textdiff") -> set[str]:
        """The keys of the flat layout for ``model``: the options and the model's own arguments."""
        own = {f.name for f in fields(cls) if f.name != "model_args"}
        return own | {f.name for f in fields(MODEL_ARGS[model_name(model)])}

    @classmethod
    def flat(cls, **keys: Any) -> FitConfig:
        """A config from flat keys, as the CLI and ``config.json`` name them:
        ``FitConfig.flat(cache=..., out=..., dim=64, fusion="none")``; a key the model lacks is refused."""
        unknown = sorted(set(keys) - cls.flat_keys(keys.get("model", "textdiff")))
        if unknown:
            raise ValueError(f"FitConfig of model {keys.get('model', 'textdiff')!r} has no {unknown}")
        return cls.from_json(keys)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FitConfig:
        """A config from the flat layout (``config.json``'s ``fit``, older ones too); other keys are ignored."""
        d = {k: tuple(v) if k in _TUPLES and isinstance(v, list) else v for k, v in d.items()}
        name = model_name(d.get("model", "textdiff"))
        args = MODEL_ARGS[name](**{f.name: d[f.name] for f in fields(MODEL_ARGS[name]) if f.name in d})
        own = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name not in ("model", "model_args")}
        return cls(model=name, model_args=args, **own)



@dataclass(frozen=True)
class Switch:
    """A command-line flag that sets FitConfig flat key ``key`` to ``value`` (``--no-augment``: augment=False)."""

    key: str
    value: Any
    help: str


#: the train commands' switches, by parameter name (the flag is ``--`` + the name with hyphens)
SWITCHES: dict[str, Switch] = {
    "no_augment": Switch("augment", False, "Do not sample the cached dihedral views."),
    "per_scale_blocks": Switch("shared_block", False, "One transformer block per scale instead of one shared."),
    "no_text": Switch("fusion", "none", "Ablation ζ1: no cross-attention, text unused (as --fusion none)."),
}
#: flat keys whose 0 on the command line means None (never)
ZERO_IS_NONE = ("lr_drop_epoch",)
_TRAINING = ("train_count", "subset_seed", "epochs", "seed", "mask_resize", "no_augment", "val_every", "device", "precision",
             "resume", "overwrite")
_OPTIMISER = ("batch_size", "lr", "lr_drop_epoch")
_HEAD = ("dim", "head_channels", "memory_budget_gb", "view_text")
#: what each train command takes on its command line besides its own arguments: FitConfig flat keys and switches
#: (the rest only through the Python API); the model each trains
COMMAND_OPTIONS: dict[str, tuple[str, ...]] = {
    "fit": ("blocks", "steps", "norm", "no_text", "fusion", "pos_enc", "per_scale_blocks", "text_gate", "dice_on_logits",
            "attend_padding", "text_dropout", "dropout_classifier", *_TRAINING, *_OPTIMISER, *_HEAD),
    "baseline": ("width", "depth", *_TRAINING, *_OPTIMISER),
    "sweep": (*_TRAINING, *_HEAD),
}
COMMAND_MODEL = {"fit": "textdiff", "baseline": "plain-unet", "sweep": "textdiff"}


def option_home(key: str) -> type:
    """The dataclass that declares flat key ``key`` (its default and help): FitConfig or a model's arguments."""
    for config in (FitConfig, *MODEL_ARGS.values()):
        if any(f.name == key for f in fields(config)):
            return config
    raise KeyError(f"no train config declares {key!r}")


def option_default(key: str) -> Any:
    """The default of flat key ``key``, as its dataclass declares it."""
    return next(f.default for f in fields(option_home(key)) if f.name == key)


def flat_from_options(command: str, values: dict[str, Any]) -> dict[str, Any]:
    """A command's parsed options (:data:`COMMAND_OPTIONS`; tuples as tuples) as FitConfig flat keys: a switch
    sets its key, 0 is None where :data:`ZERO_IS_NONE`; a switch and its key's own option are exclusive."""
    flat = {k: v for k, v in values.items() if k not in SWITCHES}
    for name, switch in SWITCHES.items():
        if not values.get(name):
            continue
        given = flat.get(switch.key, option_default(switch.key))
        if given not in (option_default(switch.key), switch.value):
            raise OptionError(f"{name}=True and {switch.key}={given!r} exclude each other: pass one", name,
                              switch.key)
        flat[switch.key] = switch.value
    for key in ZERO_IS_NONE:
        if key in flat:
            flat[key] = flat[key] or None
    return {**flat, "model": COMMAND_MODEL[command]}

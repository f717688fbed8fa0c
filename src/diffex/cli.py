"""The ``diffex`` command line: parse, call the API, print. Errors are one line with exit code 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import click

from diffex import __version__
from diffex.config import INVERSION_REFINE
from diffex.errors import DiffexError
from diffex.stages import STAGES

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Options:
    """Global options shared by every command."""

    def __init__(
        self,
        device: str,
        seed: int,
        max_pixels: int | None = None,
        compile_: bool | None = None,
        channels_last: bool | None = None,
    ) -> None:
        self.device_name = device
        self.seed = seed
        self.max_pixels = max_pixels
        self.compile = compile_
        self.channels_last = channels_last

    def setup(self) -> Any:
        """Threads, seeds and device, set once before a command computes anything."""
        from diffex.data.images import set_pixel_limit
        from diffex.runtime import (
            configure_threads,
            resolve_device,
            seed_everything,
            set_speed,
        )
        from diffex.train.distributed import process_device

        if self.max_pixels is not None:
            set_pixel_limit(self.max_pixels)
        configure_threads()
        seed_everything(self.seed)
        set_speed(compile=self.compile, channels_last=self.channels_last)
        device = process_device(resolve_device(self.device_name))
        if device.type == "cuda" and device.index is not None:
            import torch

            torch.cuda.set_device(device)
        return device


_pass_options = click.make_pass_decorator(Options)


#: Help of ``--z-norm`` (``train-autoencoder`` and ``demo``).
Z_NORM_HELP = (
    "Layer-normalise z_sem before it conditions the UNet, so edits far past the data do not "
    "blow up or collapse the decoder's gains."
)
AXIS_INVARIANCE_HELP = (
    "Weight of a penalty on the decoder changing the imaging (background, position, nucleus "
    "gain) when z_sem moves past the data along the class axis, away from the other class by "
    "up to 3 class gaps (0 = off; an experiment against the reverse-half dimming that weakens "
    "the class signal: BENCHMARKS.md)."
)


def pass_options(f: Any) -> Any:
    """Pass the global Options, and accept --device/--seed after the command name as well."""

    @click.option(
        "--seed",
        "cmd_seed",
        type=int,
        default=None,
        help="Random seed (overrides the global --seed).",
    )
    @click.option(
        "--device",
        "cmd_device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default=None,
        help="Where to compute (overrides the global --device).",
    )
    @_pass_options
    @functools.wraps(f)
    def wrapper(
        opts: Options, *args: Any, cmd_seed: int | None, cmd_device: str | None, **kwargs: Any
    ) -> Any:
        if cmd_seed is not None:
            opts.seed = cmd_seed
        if cmd_device is not None:
            opts.device_name = cmd_device
        return f(opts, *args, **kwargs)

    return wrapper


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="diffex")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to compute; auto picks CUDA when available.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed for everything.")
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=64_000_000,
    show_default=True,
    help="Refuse images larger than this (height x width), checked before decoding.",
)
@click.option(
    "--compile/--no-compile",
    "compile_",
    default=None,
    help="torch.compile the networks while training [default: on with CUDA, off on CPU].",
)
@click.option(
    "--channels-last/--no-channels-last",
    "channels_last",
    default=None,
    help="NHWC memory layout for the convolutional networks, training and decoding [default: "
    "on; on 2 CPU cores it trains 1.2-1.3x and decodes 1.5x faster than NCHW].",
)
@click.pass_context
def cli(
    ctx: click.Context,
    device: str,
    seed: int,
    max_pixels: int,
    compile_: bool | None,
    channels_last: bool | None,
) -> None:
    """Explain an image classifier with a diffusion autoencoder: which visible attributes move
    its decision, shown as counterfactual images and measured in plain terms.

    Global options go before the command: diffex --device cpu --seed 1 COMMAND ...
    """
    ctx.obj = Options(device, seed, max_pixels, compile_, channels_last)


@cli.command(context_settings=CONTEXT)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder to write (one subfolder per condition).",
)
@click.option(
    "--n",
    "n",
    type=int,
    default=3000,
    show_default=True,
    help="Total number of images, split evenly over the conditions.",
)
@click.option(
    "--spec",
    type=click.Path(path_type=Path),
    default=None,
    help="YAML spec of factors and conditions [default: built-in].",
)
@click.option("--size", type=int, default=None, help="Image size in pixels [default: the spec's].")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["png", "tiff"]),
    default="png",
    show_default=True,
    help="png: 8-bit RGB; tiff: 16-bit channel-first.",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@pass_options
def synth(
    opts: Options, out: Path, n: int, spec: Path | None, size: int | None, fmt: str, overwrite: bool
) -> None:
    """Generate the synthetic cell benchmark with known ground-truth factors.

    Writes OUT/<condition>/*.png|tif, factors.csv (true factor values per image), spec.yaml,
    dataset.json (channel names and colours) and contact_sheet.png.
    """
    from diffex.data.spec import load_spec
    from diffex.data.synth import generate

    if n < 2:
        raise DiffexError(f"--n must be at least 2, got {n}")
    if size is not None and size < 16:
        raise DiffexError(f"--size must be at least 16, got {size}")
    folder = generate(
        load_spec(spec), out, n=n, seed=opts.seed, size=size, fmt=fmt, overwrite=overwrite
    )
    click.echo(f"wrote {n} images to {folder}")
    click.echo(f"  ground truth:  {folder / 'factors.csv'}")
    click.echo(f"  contact sheet: {folder / 'contact_sheet.png'}")


@cli.group(context_settings=CONTEXT)
def prepare() -> None:
    """Turn a published data set into images plus a manifest that DiffEx reads."""


@prepare.command("bbbc021", context_settings=CONTEXT)
@click.option(
    "--images",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder holding the plate folders (Week1_22123/, ...) of the BBBC021 download.",
)
@click.option(
    "--metadata",
    type=click.Path(path_type=Path),
    required=True,
    help="BBBC021_v1_image.csv.",
)
@click.option(
    "--moa",
    type=click.Path(path_type=Path),
    default=None,
    help="BBBC021_v1_moa.csv (needed for moa:NAME conditions).",
)
@click.option(
    "--conditions",
    required=True,
    multiple=True,
    help='Two or more conditions, each "COMPOUND@CONCENTRATION" (e.g. "DMSO@0.0"), a bare '
    'compound (any concentration) or "moa:NAME": --conditions "DMSO@0.0" "taxol@0.3".',
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder (DATA).")
@click.option(
    "--crop-size", type=click.IntRange(min=8), default=96, show_default=True, help="Crop side."
)
@click.option(
    "--centres",
    type=click.Path(path_type=Path),
    default=None,
    help="CSV of nucleus centres (Image_FileName_DAPI or ImageNumber, x, y) instead of "
    "segmenting DAPI.",
)
@click.option(
    "--max-cells-per-image",
    type=click.IntRange(min=1),
    default=None,
    help="Keep a seeded random subset of the cells of each image.",
)
@click.option(
    "--min-nucleus-area",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Smallest nucleus (pixels) when segmenting.",
)
@pass_options
def prepare_bbbc021_cmd(opts: Options, **kw: Any) -> None:
    """Single-cell crops from the BBBC021 layout (DAPI, tubulin, actin TIFFs per plate).

    Selects the images of each condition from the metadata (and MOA) tables, finds nuclei in
    DAPI (or reads --centres), normalises each plate and channel by percentiles, cuts crops
    that do not touch the border and writes DATA/crops/, DATA/manifest.csv (plate as the group,
    so no plate is split across train, val and test) and DATA/dataset.json (channel names and
    colours). Then: diffex train-classifier --data DATA/manifest.csv ...
    """
    from diffex.data.bbbc021 import Bbbc021Config, prepare_bbbc021

    opts.setup()
    cfg = Bbbc021Config(**{**kw, "conditions": list(kw["conditions"])}, seed=opts.seed)
    summary = prepare_bbbc021(cfg)
    click.echo(f"crops: {summary['crops']} ({summary['skipped_border']} skipped at the border)")
    for label, n in summary["per_condition"].items():
        click.echo(f"  {label}: {n}")
    click.echo(f"manifest: {Path(kw['out']) / 'manifest.csv'}")


@prepare.command("digits", context_settings=CONTEXT)
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Output image folder (DATA)."
)
@click.option(
    "--digits",
    default="3,8",
    show_default=True,
    help="Which digits, comma-separated (two or more).",
)
@click.option(
    "--size",
    type=click.IntRange(min=8),
    default=48,
    show_default=True,
    help="Image side (48 fits both demo presets).",
)
def prepare_digits_cmd(out: Path, digits: str, size: int) -> None:
    """Real handwritten digits that ship with scikit-learn (8x8 scans, upsampled): a small real
    data set for trying DiffEx, e.g. "3 vs 8". Needs pip install 'diffex[examples]'."""
    from diffex.data.digits import prepare_digits

    try:
        chosen = [int(d) for d in digits.split(",") if d.strip()]
    except ValueError:
        raise DiffexError(f"--digits must be comma-separated digits, got {digits!r}") from None
    counts = prepare_digits(out, chosen, size)
    click.echo(f"digits: {', '.join(f'{k}: {v}' for k, v in counts.items())} in {out}")


_NATIVE_BF16 = "where the hardware has native bf16 (recent GPUs; CPUs with AVX512-BF16 or AMX)"
_DECODE_PRECISION = (
    f"auto: the UNet of the DDIM decodes under bf16 autocast {_NATIVE_BF16}, else fp32; the "
    "classifier and the measurements stay fp32."
)


def _precision_option(help_text: str) -> Any:
    return click.option(
        "--precision",
        type=click.Choice(["auto", "fp32", "bf16"]),  # runtime.PRECISIONS (no torch import here)
        default="auto",
        show_default=True,
        help=help_text,
    )


SPAN_HELP = (
    "Keep every edit within the principal axes holding this share of the training latents' "
    "variance (0.999, say; unset: unconstrained). z_sem fills only a few of its dimensions, and "
    'off them the decoder was hardly trained (BENCHMARKS.md, "The default on a Xeon host").'
)
#: ``--hold-area`` choices: train.directions.HOLD_AREA (no torch import here)
HOLD_AREA_CHOICES = ("auto", "on", "off")
HOLD_AREA_HELP = (
    "Also hold the cell area the actin channel outlines in the invariance penalty: on, off, "
    "or auto (only where the real classes do not differ in it, so that a phenotype of cell "
    "size stays findable)."
)
T_EDIT_MAX_HELP = (
    "Draw each training image's noise level for the one-step decodes from 400 up to this "
    "level (unset: always 400), so that the invariance penalty also sees what an edit does "
    "at the noisier levels (measured at 800 on the fast preset: no change in the leaks; "
    "BENCHMARKS: 'Decoded invariance')."
)
DECODED_INVARIANCE_HELP = (
    "Weight of a second invariance penalty measured on full few-step decodes of edits from "
    "the images' exact inversion, at +alpha and -alpha, which also holds the background's "
    "grain (0 = off; BENCHMARKS: 'Decoded invariance')."
)
DECODED_CORE_HELP = (
    "Weight, within the decoded invariance penalty, of the nucleus core's brightness (the "
    "readout's brightness: the nucleus above half its plateau, eroded), which the plateau that "
    "the penalty holds can miss (0 = off; needs --decoded-invariance)."
)
DECODED_EVERY_HELP = (
    "Add the decoded invariance penalty on every n-th training step only (it costs most of a "
    "step's time)."
)
CLASSIFIER_OUTPUT_HELP = (
    "Which classifier output joins the encoder's w in z_sem: probs (the authors'), logits, "
    "or the penultimate features (BENCHMARKS: 'Conditioning on the classifier's features')."
)
GAIN_MARGIN_HELP = (
    "Bound the UNet's z gains, per channel, to their range over the training images widened "
    "by this share of it on each side, so that edits far past the data do not extrapolate the "
    "decoder (BENCHMARKS: 'Gains bounded to the data') [default: unbounded]."
)

LEGIBLE_WITHIN_HELP = (
    "Let each ranked pick be the most legible edit (the one whose clearest cell measurement "
    "changes most consistently from cell to cell; imaging measurements do not count) among "
    "the edits that raise p(target) by at least (1 - this share) of the best; 0: by delta-p "
    "alone (BENCHMARKS: 'Legible edits')."
)

INVERSION_REFINE_HELP = (
    "Refine the DDIM inversion of each image by fixed-point iteration, up to this many more "
    "UNet calls per level, so that decoding its x_T gives the image back (0: plain inversion, "
    "which loses the background level and the noise of the cells; BENCHMARKS: 'Exact "
    "inversion')."
)


#: Options that a stage's command and ``demo`` both take: their flags and click settings.
#: ``demo`` declares them unset (the preset's value) and names the stage they reach.
SHARED_OPTIONS: dict[str, dict[str, Any]] = {
    "gain_margin": {"decls": ("--gain-margin",), "type": click.FloatRange(min=0)},
    "inversion_refine": {"decls": ("--inversion-refine",), "type": click.IntRange(min=0)},
    "span": {"decls": ("--span",), "type": click.FloatRange(min=0, max=1, min_open=True)},
    "hold_area": {"decls": ("--hold-area",), "type": click.Choice(HOLD_AREA_CHOICES)},
    "t_edit_max": {"decls": ("--t-edit-max",), "type": click.IntRange(min=1)},
    "decoded_invariance": {"decls": ("--decoded-invariance",), "type": click.FloatRange(min=0)},
    "decoded_core": {"decls": ("--decoded-core",), "type": click.FloatRange(min=0)},
    "decoded_every": {"decls": ("--decoded-every",), "type": click.IntRange(min=1)},
    "axis_invariance": {"decls": ("--axis-invariance",), "type": click.FloatRange(min=0)},
    "legible_within": {
        "decls": ("--legible-within",),
        "type": click.FloatRange(min=0, max=1, max_open=True),
    },
    "z_norm": {"decls": ("--z-norm/--no-z-norm",)},
    "classifier_output": {  # models.autoencoder.CLASSIFIER_OUTPUTS (no torch import here)
        "decls": ("--classifier-output",),
        "type": click.Choice(["probs", "logits", "features"]),
    },
}


def _shared_option(name: str, default: Any, help_text: str) -> Any:
    """The shared option ``name`` (:data:`SHARED_OPTIONS`) with this default and help; an
    unset default (None) is not shown."""
    spec = dict(SHARED_OPTIONS[name])
    return click.option(
        *spec.pop("decls"),
        default=default,
        show_default=default is not None,
        help=help_text,
        **spec,
    )


def _gain_margin_option() -> Any:
    return _shared_option("gain_margin", None, GAIN_MARGIN_HELP)


def _inversion_option() -> Any:
    return _shared_option("inversion_refine", INVERSION_REFINE, INVERSION_REFINE_HELP)


def _checkpoint_option(default: int) -> Any:
    return click.option(
        "--checkpoint-every",
        type=click.IntRange(min=1),
        default=default,
        show_default=True,
        help="Save the whole training state every N steps; rerunning the command resumes.",
    )


def _classifier_options(f: Any) -> Any:
    options = [
        click.option(
            "--image-size",
            type=int,
            default=64,
            show_default=True,
            help="Model input size; images are centre-cropped and resized.",
        ),
        click.option(
            "--preset",
            type=click.Choice(["tiny", "small", "base"]),
            default="small",
            show_default=True,
            help="Network size.",
        ),
        click.option(
            "--epochs",
            type=int,
            default=20,
            show_default=True,
            help="Maximum epochs (early stop on validation loss).",
        ),
        click.option(
            "--batch-size", type=int, default=64, show_default=True, help="Images per step."
        ),
        click.option(
            "--lr", type=float, default=2e-3, show_default=True, help="Peak AdamW learning rate."
        ),
        click.option(
            "--patience",
            type=int,
            default=5,
            show_default=True,
            help="Evaluations without improvement before stopping.",
        ),
        click.option(
            "--min-steps",
            type=click.IntRange(min=1),
            default=200,
            show_default=True,
            help="Train at least this many steps, however small the data set.",
        ),
        click.option(
            "--gain-sd",
            type=click.FloatRange(0.0, 1.0),
            default=0.0,
            show_default=True,
            help="Augment with a random overall stain gain exp(N(0, SD)) per image, shared by "
            "its channels, so the classifier learns to ignore it (0 = off; use it only where "
            "the gain is not biology).",
        ),
        click.option(
            "--stem-stride",
            type=click.Choice(["1", "2"]),
            default=None,
            callback=lambda _ctx, _param, v: None if v is None else int(v),
            help="Stride of the first convolution [default: 2 from 64 px up, else 1]; 2 trains "
            "a 48 px classifier about 3 times faster, with test accuracy 0.86 to 0.90 on the "
            'demo\'s seeds 0 to 2 (BENCHMARKS, "Patched networks").',
        ),
        click.option(
            "--temperature/--no-temperature",
            default=True,
            show_default=True,
            help="Fit a calibration temperature on validation data.",
        ),
        _checkpoint_option(100),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _data_run_options(f: Any) -> Any:
    """--data and --run of the commands that make a run's classifier."""
    f = click.option(
        "--run",
        type=click.Path(path_type=Path),
        required=True,
        help="Run folder; writes RUN/data.json and RUN/classifier/.",
    )(f)
    return click.option(
        "--data",
        type=click.Path(path_type=Path),
        required=True,
        help="Image folder (class = subfolder) or CSV manifest (path,label[,group]).",
    )(f)


@cli.command("train-classifier", context_settings=CONTEXT)
@_data_run_options
@_classifier_options
@pass_options
def train_classifier_cmd(opts: Options, data: Path, run: Path, **kw: Any) -> None:
    """Train the classifier that DiffEx explains (a small ResNet) and report its metrics.

    Splits the data 70/15/15 (stratified by class; grouped by plate, well or source image when the
    manifest has a group column), trains with flips and 90-degree rotations, keeps the best
    checkpoint, fits a temperature and writes RUN/classifier/ (model.safetensors, config.json,
    metrics.json, training_curve.png, confusion_reliability.png).
    """
    from diffex.train.classifier import train_classifier

    device = opts.setup()
    metrics = train_classifier(data, run, _classifier_config(opts, **kw), device)
    _print_classifier(metrics, run)


def _floats(text: str | None, name: str) -> list[float]:
    """``"0.5,0.5,0.5"`` -> floats, with a one-line error naming the option."""
    if not text:
        return []
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise DiffexError(f"{name} must be comma-separated numbers, got {text!r}") from None


def _external_options(f: Any) -> Any:
    """The declared interface of a user's classifier (use-classifier and demo --data)."""
    options = [
        click.option(
            "--classifier-script",
            type=click.Path(path_type=Path),
            default=None,
            help="TorchScript file of your classifier (torch.jit.save of a scripted or traced "
            "model).",
        ),
        click.option(
            "--classifier-entry",
            default=None,
            metavar="MODULE:FACTORY",
            help="A Python callable returning your nn.Module with its weights loaded "
            "(module:factory, or path/to/file.py:factory).",
        ),
        click.option(
            "--input-size",
            type=click.IntRange(min=1),
            default=None,
            help="Side length your classifier expects; DiffEx resizes to it [default: the run's "
            "image size].",
        ),
        click.option(
            "--in-channels",
            type=click.IntRange(min=1),
            default=None,
            help="Channels your classifier expects; one-channel data is repeated to fill them "
            "[default: the data's].",
        ),
        click.option(
            "--pixel-scale",
            type=click.Choice(["unit", "model"]),
            default="unit",
            show_default=True,
            help="unit: pixels as stored, over their full scale, in [0, 1] (then --mean/--std); "
            "model: DiffEx's own normalised [-1, 1].",
        ),
        click.option(
            "--mean", default=None, help="Per-channel input mean, e.g. 0.485,0.456,0.406."
        ),
        click.option("--std", default=None, help="Per-channel input sd, e.g. 0.229,0.224,0.225."),
        click.option(
            "--class-names",
            default=None,
            help="Your classifier's outputs in order, comma-separated, using the data's class "
            "names [default: the data's classes, sorted].",
        ),
        click.option(
            "--features",
            default=None,
            help="Layer (submodule name) or method giving features; pooled over space when a map "
            "[default: none, the logits].",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _external_spec(kw: dict[str, Any]) -> Any:
    """Pop the external-classifier options from ``kw``; None when neither source is given."""
    from diffex.models.external import ExternalSpec

    script, entry = kw.pop("classifier_script"), kw.pop("classifier_entry")
    declared = {k: kw.pop(k) for k in ("input_size", "in_channels", "pixel_scale", "features")}
    mean, std, names = kw.pop("mean"), kw.pop("std"), kw.pop("class_names")
    if script is not None and entry is not None:
        raise DiffexError("give --classifier-script or --classifier-entry, not both")
    if script is None and entry is None:
        return None
    return ExternalSpec(
        kind="torchscript" if script is not None else "entry",
        source=str(script if script is not None else entry),
        mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"),
        class_names=[c.strip() for c in names.split(",") if c.strip()] if names else [],
        **declared,
    )


@cli.command("use-classifier", context_settings=CONTEXT)
@_data_run_options
@_external_options
@click.option(
    "--image-size",
    type=click.IntRange(min=16),
    default=None,
    help="DiffEx's image size for this run [default: --input-size, else 64].",
)
@click.option(
    "--temperature/--no-temperature",
    default=True,
    show_default=True,
    help="Fit a calibration temperature on validation data.",
)
@pass_options
def use_classifier_cmd(opts: Options, data: Path, run: Path, **kw: Any) -> None:
    """Explain your own classifier instead of training one: attach it to a run.

    Loads it (TorchScript or a Python factory), checks it on a batch of the data (input shape,
    number of classes, NaN outputs), fits a temperature on the validation split, scores it, and
    writes RUN/classifier/ (a copy of the weights, config.json, metrics.json, plots). The split
    is the same as train-classifier's: if your classifier saw some of these images in training,
    its scores here are optimistic.
    """
    from diffex.train.attach import AttachConfig, attach_classifier

    spec = _external_spec(kw)
    if spec is None:
        raise DiffexError("give --classifier-script FILE.pt or --classifier-entry MODULE:FACTORY")
    device = opts.setup()
    cfg = AttachConfig(
        image_size=kw["image_size"], temperature_scaling=kw["temperature"], seed=opts.seed
    )
    metrics = attach_classifier(data, run, spec, cfg, device)
    _print_classifier(metrics, run)


def _classifier_config(opts: Options, **kw: Any) -> Any:
    from diffex.train.classifier import ClassifierTrainConfig

    temperature = kw.pop("temperature", True)
    return ClassifierTrainConfig(**kw, temperature_scaling=temperature, seed=opts.seed)


def _print_classifier(metrics: dict[str, Any], run: Path) -> None:
    for split in ("val", "test"):
        if split in metrics:
            m = metrics[split]
            click.echo(
                f"{split}: accuracy {m['accuracy']:.3f}, balanced accuracy "
                f"{m['balanced_accuracy']:.3f}, ECE {m['ece']:.3f} "
                f"(before temperature {m['ece_before_temperature']:.3f})"
            )
    click.echo(f"classifier: {run / 'classifier'}")


def _autoencoder_options(f: Any) -> Any:
    options = [
        click.option(
            "--preset",
            "ae_preset",
            type=click.Choice(["tiny", "cpu64", "cpu64p", "paper128"]),
            default="cpu64",
            show_default=True,
            help="Network size: cpu64 for CPUs; cpu64p is cpu64 on 2 x 2 pixel patches (demo "
            "--preset fast's: about the same parameters, 2 times faster to train on a CPU, but "
            "its edits dimmed the stain more); paper128 is the authors' 128 px model.",
        ),
        click.option(
            "--steps", "ae_steps", type=int, default=2000, show_default=True, help="Training steps."
        ),
        click.option(
            "--batch-size",
            "ae_batch_size",
            type=int,
            default=32,
            show_default=True,
            help="Images per step.",
        ),
        click.option(
            "--lr",
            "ae_lr",
            type=float,
            default=3e-4,
            show_default=True,
            help="AdamW learning rate.",
        ),
        click.option(
            "--accumulate",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Split each batch into N micro-batches (same result, less GPU memory).",
        ),
        _precision_option(f"auto: bf16 autocast {_NATIVE_BF16}, else fp32."),
        _shared_option("classifier_output", "probs", CLASSIFIER_OUTPUT_HELP),
        click.option(
            "--prediction",
            type=click.Choice(["v", "eps"]),
            default="v",
            show_default=True,
            help="What the UNet predicts: v (stable at high noise, so decoding from z alone "
            "works early) or eps (the authors').",
        ),
        _shared_option("z_norm", False, Z_NORM_HELP),
        click.option(
            "--gain-sd",
            type=click.FloatRange(0.0, 1.0),
            default=0.0,
            show_default=True,
            help="Train on images with a random overall stain gain exp(N(0, SD)) (0 = off; "
            "measured on the demo, it does not stop the reverse-half dimming: BENCHMARKS.md).",
        ),
        _shared_option("axis_invariance", 0.0, AXIS_INVARIANCE_HELP),
        click.option(
            "--attention",
            default=None,
            metavar="PX,...",
            help="Feature-map sizes (px) whose UNet blocks use self-attention, comma-separated, "
            "or 'none'; the middle block's attention stays [default: the preset's, 16 and 8 "
            "for cpu64].",
        ),
        click.option(
            "--t-skew",
            type=float,
            default=1.0,
            show_default=True,
            help="Sample noisy timesteps more often (0 = uniform); teaches z early.",
        ),
        click.option(
            "--consistency",
            "consistency_weight",
            type=float,
            default=0.1,
            show_default=True,
            help="Weight of the classifier-consistency loss (0 turns it off).",
        ),
        click.option(
            "--ddim-steps",
            type=int,
            default=50,
            show_default=True,
            help="DDIM steps for encoding and decoding in the evaluation.",
        ),
        click.option(
            "--sample-every",
            type=int,
            default=500,
            show_default=True,
            help="Write a sample grid every N steps.",
        ),
        _checkpoint_option(100),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _attention(text: str | None) -> list[int] | None:
    """``--attention``: None (the preset's), [] for 'none', else the listed feature-map sizes."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DiffexError(
            f"--attention must be comma-separated sizes in px or 'none', got {text!r}"
        ) from None


def _autoencoder_config(opts: Options, **kw: Any) -> Any:
    from diffex.train.autoencoder import AutoencoderTrainConfig

    return AutoencoderTrainConfig(
        preset=kw["ae_preset"],
        steps=kw["ae_steps"],
        batch_size=kw["ae_batch_size"],
        lr=kw["ae_lr"],
        classifier_output=kw["classifier_output"],
        prediction=kw["prediction"],
        z_norm=kw["z_norm"],
        attention=_attention(kw["attention"]),
        gain_sd=kw["gain_sd"],
        axis_invariance=kw["axis_invariance"],
        t_skew=kw["t_skew"],
        consistency_weight=kw["consistency_weight"],
        ddim_steps=kw["ddim_steps"],
        sample_every=kw["sample_every"],
        accumulate=kw["accumulate"],
        precision=kw["precision"],
        checkpoint_every=kw["checkpoint_every"],
        seed=opts.seed,
    )


@cli.command("train-autoencoder", context_settings=CONTEXT)
@click.option(
    "--run",
    type=click.Path(path_type=Path),
    required=True,
    help="Run folder with a trained classifier; writes RUN/autoencoder/.",
)
@_autoencoder_options
@pass_options
def train_autoencoder_cmd(opts: Options, run: Path, **kw: Any) -> None:
    """Train the classifier-aware diffusion autoencoder on the run's training split.

    z_sem = Linear([classifier output; encoder(x)]) conditions every UNet block. After training,
    the EMA weights are evaluated on held-out images: decode(encode(x)) and decode(z, noise)
    (PSNR, SSIM, classifier agreement; the UNet decodes in the precision it trained in, as
    rank, explain and evaluate do), written to RUN/autoencoder/metrics.json with
    reconstructions.png, training_curve.png and sample grids in RUN/autoencoder/samples/.
    """
    from diffex.train.autoencoder import train_autoencoder

    device = opts.setup()
    metrics = train_autoencoder(run, _autoencoder_config(opts, **kw), device)
    _print_autoencoder(metrics, run)


def _print_autoencoder(metrics: dict[str, Any], run: Path) -> None:
    for name in ("roundtrip", "semantic_only"):
        m = metrics[name]
        click.echo(
            f"{name}: PSNR {m['psnr']:.1f} dB, SSIM {m['ssim']:.3f}, classifier agreement "
            f"{m['agreement']:.3f} (KL {m['kl']:.3f})"
        )
    click.echo(f"autoencoder: {run / 'autoencoder'} (grid: reconstructions.png)")


@cli.command("train-directions", context_settings=CONTEXT)
@click.option(
    "--run",
    type=click.Path(path_type=Path),
    required=True,
    help="Run folder with a trained autoencoder; writes RUN/directions/.",
)
@click.option("--k", "k", type=int, default=10, show_default=True, help="Number of directions.")
@click.option(
    "--restarts",
    type=int,
    default=2,
    show_default=True,
    help="Sets of K directions trained side by side from different random starts; rank keeps "
    "the set whose best edit moves the classifier most (1 = a single set, half the time).",
)
@click.option(
    "--kind",
    type=click.Choice(["nonlinear", "linear", "global"]),
    default="nonlinear",
    show_default=True,
    help="Direction model: MLP per direction, linear map, or vector.",
)
@click.option(
    "--objective",
    type=click.Choice(["classifier", "encoder", "paper"]),
    default="classifier",
    show_default=True,
    help="What the contrast sees: classifier features of the one-step decoded edit, "
    "encoder features of it, or the authors' latent projector.",
)
@click.option(
    "--alpha",
    type=float,
    default=1.0,
    show_default=True,
    help="Edit size in class gaps (distance between class means in standardised z).",
)
@click.option("--steps", type=int, default=300, show_default=True, help="Training steps.")
@click.option(
    "--batch-size",
    type=int,
    default=8,
    show_default=True,
    help="Latents per step (each edited by all K directions).",
)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option(
    "--decorrelation",
    type=float,
    default=0.0,
    show_default=True,
    help="Weight of the penalty on correlated shifts at the same latent.",
)
@click.option(
    "--invariance",
    type=click.FloatRange(min=0),
    default=0.3,
    show_default=True,
    help="Weight of the penalty on edits that change the background level, move the cell in "
    "its frame or change the nucleus channel's gain (squared change in natural sds of real "
    "images; image objectives only, 0 = off).",
)
@click.option(
    "--signs",
    type=click.Choice(["plus", "both"]),
    default="plus",
    show_default=True,
    help="Train edits at +alpha only, or at a random sign per image (the penalty then also "
    "holds the reverse half of a sweep; measured on the demo, it weakens the edits: "
    "BENCHMARKS.md).",
)
@click.option(
    "--reverse",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Also decode each edit at -alpha and add this weight times its invariance penalty "
    "(0 = off; doubles the decodes; measured on the demo, it weakens the edits).",
)
@_shared_option("span", None, SPAN_HELP)
@_shared_option("hold_area", "off", HOLD_AREA_HELP)
@_shared_option("t_edit_max", None, T_EDIT_MAX_HELP)
@_shared_option("decoded_invariance", 0.0, DECODED_INVARIANCE_HELP)
@_shared_option("decoded_core", 0.0, DECODED_CORE_HELP)
@click.option(
    "--decoded-steps",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="DDIM steps of the decoded invariance penalty's decodes.",
)
@click.option(
    "--decoded-images",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Images per batch whose edits the decoded invariance penalty decodes.",
)
@_shared_option("decoded_every", 1, DECODED_EVERY_HELP)
@_precision_option(
    f"auto: the one-step decodes under bf16 autocast {_NATIVE_BF16}, else fp32; features and "
    "losses stay fp32."
)
@_checkpoint_option(50)
@pass_options
def train_directions_cmd(opts: Options, run: Path, **kw: Any) -> None:
    """Learn K latent directions by contrast (LatentCLR adapted to z_sem).

    z_sem is standardised over the training images; edits move it by alpha class gaps along
    each direction. Writes RUN/directions/ (model.safetensors, config.json, metrics.json with the
    loss curve and the contrastive accuracy on held-out latents, training_curve.png).
    """
    from diffex.train.directions import DirectionTrainConfig, train_directions

    device = opts.setup()
    metrics = train_directions(run, DirectionTrainConfig(**kw, seed=opts.seed), device)
    acc = metrics.get("final", {}).get("heldout_accuracy", float("nan"))
    click.echo(
        f"directions: held-out contrastive accuracy {acc:.3f}, class gap {metrics['class_gap']:.2f}"
    )
    click.echo(f"directions: {run / 'directions'}")


@cli.command("rank", context_settings=CONTEXT)
@click.option(
    "--run",
    type=click.Path(path_type=Path),
    required=True,
    help="Run folder with trained directions; writes RUN/ranking.json.",
)
@click.option(
    "--target",
    default=None,
    help="Class the edits should move towards [default with two classes: the second].",
)
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="Edit size in class gaps [default: the alpha the directions were trained at].",
)
@click.option(
    "--m", "m", type=int, default=5, show_default=True, help="Directions to rank (at most K)."
)
@click.option(
    "--n-images", type=int, default=64, show_default=True, help="Held-out source images to edit."
)
@click.option(
    "--ddim-steps",
    type=int,
    default=20,
    show_default=True,
    help="DDIM steps for encoding and decoding.",
)
@click.option(
    "--calibrate/--no-calibrate",
    default=True,
    show_default=True,
    help="Shrink each ranked direction's alpha (never above the ranking alpha) to the smallest "
    "that makes validation cells look like the target class to the classifier.",
)
@click.option(
    "--flip-target",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Calibrate to the smallest alpha that flips this share of validation cells "
    "[default: the edit must make the classifier call as many source cells the target as it "
    "calls real target cells the target].",
)
@click.option(
    "--calibration-images",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Validation cells of the other classes that the calibration edits (more: a finer "
    "share, slower).",
)
@click.option(
    "--min-explained",
    type=click.FloatRange(0, 1),
    default=0.05,
    show_default=True,
    help="Stop ranking when the next direction would explain fewer than this share of the "
    "source images (at least one image).",
)
@click.option(
    "--max-cosine",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.9,
    show_default=True,
    help="Directions whose mean latent shift has |cos| >= this with a ranked one make the same "
    "edit: they are listed as its duplicates and not ranked again (1 = only identical ones).",
)
@click.option(
    "--keep-flagged",
    is_flag=True,
    help="Rank directions the artifact guard flags (noise, background) too.",
)
@_shared_option("legible_within", 0.0, LEGIBLE_WITHIN_HELP)
@_gain_margin_option()
@_inversion_option()
@_precision_option(_DECODE_PRECISION)
@pass_options
def rank_cmd(opts: Options, run: Path, **kw: Any) -> None:
    """Rank the directions by how much they move the classifier towards the target (AttFind).

    Each held-out image of the other classes is encoded once; every direction and sign is
    decoded in batches; delta-p is measured against the unedited reconstruction. Edits that
    mainly add noise or change the background are flagged and not ranked. The class-mean
    direction is reported beside the ranking as a supervised reference.
    """
    from diffex.explain.rank import RankConfig, rank_directions

    device = opts.setup()
    result = rank_directions(run, RankConfig(**kw, seed=opts.seed), device)
    _print_ranking(result)
    click.echo(f"ranking: {run / 'ranking.json'}")


def _print_ranking(result: dict[str, Any]) -> None:
    click.echo(
        f"ranking towards {result['target_class']} at alpha {result['alpha']:g} "
        f"({result['n_images']} images):"
    )
    for d in result["directions"]:
        flags = f"  flags: {', '.join(d['artifact_flags'])}" if d["artifact_flags"] else ""
        click.echo(
            f"  {d['rank']}. direction {d['direction']} ({'+' if d['sign'] > 0 else '-'}): "
            f"delta-p {d['mean_delta_p']:+.3f}, flip rate {d['flip_rate']:.2f}{flags}"
            + (f"; calibrated alpha {d['alpha']:.2f}" if "alpha" in d else "")
            + (f"; same edit as directions {d['duplicates']}" if d.get("duplicates") else "")
        )
    if not result["directions"]:
        click.echo("  no direction passed the threshold")
    if result.get("stop_reason"):
        click.echo(f"  stopped: {result['stop_reason']}")
    sets = result.get("restarts") or {}
    if sets.get("n", 1) > 1:
        best = ", ".join("-" if b is None else f"{b:+.3f}" for b in sets["best_mean_delta_p"])
        close = ""
        if sets.get("margin") is not None:
            close = f"; margin {sets['margin']:+.3f} ± {sets['margin_se']:.3f} SE per image"
            close += ", a close call" if sets.get("close") else ""
        click.echo(
            f"  directions of restart {sets['chosen']} (of {sets['n']}; each restart's best "
            f"edit: {best}{close})"
        )
    ref = result["reference"]
    click.echo(
        f"  reference (class-mean direction): delta-p {ref['mean_delta_p']:+.3f}, "
        f"flip rate {ref['flip_rate']:.2f}"
    )


@cli.command("explain", context_settings=CONTEXT)
@click.option(
    "--run",
    type=click.Path(path_type=Path),
    required=True,
    help="Run folder with ranking.json; writes RUN/explanations/.",
)
@click.option(
    "--n-cells",
    type=int,
    default=64,
    show_default=True,
    help="Cells edited per direction (curves and measurements).",
)
@click.option(
    "--n-alphas",
    type=int,
    default=7,
    show_default=True,
    help="Frames of the sweep from -alpha to +alpha (odd).",
)
@click.option(
    "--ddim-steps",
    type=int,
    default=None,
    help="DDIM steps [default: the ranking's, so the readout measures the edit it chose].",
)
@click.option(
    "--measure/--no-measure",
    default=True,
    show_default=True,
    help="Morphology readout (needs cell images with nucleus/actin/spots channels).",
)
@click.option(
    "--unranked",
    "unranked",
    multiple=True,
    metavar="K+|K-",
    help="Also explain this learned direction and sign (e.g. 8-; repeatable) although the "
    "ranking did not rank it, at the ranking's alpha, into RUN/explanations/unranked_dirK+: to "
    "see what the ranking passed over (ranking.json lists every pair's delta-p under all_pairs).",
)
@_gain_margin_option()
@_inversion_option()
@_precision_option(_DECODE_PRECISION)
@pass_options
def explain_cmd(opts: Options, run: Path, unranked: tuple[str, ...], **kw: Any) -> None:
    """Show each ranked direction: strips over alpha, a GIF, the probability curve, a
    difference map, per-channel panels and the morphology readout (RUN/explanations/)."""
    from diffex.explain.explain import ExplainConfig, explain_run
    from diffex.explain.methods import parse_pair

    pairs = [parse_pair(p) for p in unranked]
    device = opts.setup()
    explain_run(run, ExplainConfig(**kw, seed=opts.seed), device, unranked=pairs)
    click.echo(f"explanations: {run / 'explanations'}")


@cli.command("evaluate", context_settings=CONTEXT)
@click.option(
    "--run",
    type=click.Path(path_type=Path),
    required=True,
    help="Run folder with ranking.json (and explanations/); writes RUN/evaluation.json.",
)
@click.option(
    "--n-images", type=int, default=64, show_default=True, help="Held-out source images to edit."
)
@click.option("--ddim-steps", type=int, default=20, show_default=True, help="DDIM steps.")
@click.option(
    "--cout-steps", type=int, default=50, show_default=True, help="Insertion steps of COUT."
)
@click.option(
    "--n-real",
    type=int,
    default=256,
    show_default=True,
    help="Real held-out target-class images that realism compares with.",
)
@click.option(
    "--sensitivity-cells",
    type=click.IntRange(min=2),
    default=256,
    show_default=True,
    help="Synthetic data only: cells the generator draws to measure the classifier's own "
    "response to each factor.",
)
@click.option(
    "--imagenet/--no-imagenet",
    default=True,
    show_default=True,
    help="Realism in EfficientNet-Lite0 (ImageNet) features too, beside the classifier's.",
)
@click.option(
    "--imagenet-size",
    type=int,
    default=224,
    show_default=True,
    help="Side the composite images are resized to (bilinear) for EfficientNet-Lite0.",
)
@click.option(
    "--method",
    type=click.Choice(["all", "diffex", "gcd"]),
    default="all",
    show_default=True,
    help="all: DiffEx and every baseline the run has (RUN/baselines/*/ranking.json).",
)
@click.option(
    "--compare",
    multiple=True,
    metavar="LABEL=RUN",
    help="Add another run's evaluation (same data, classifier and autoencoder) to the "
    "side-by-side table, e.g. paper=runs/demo_paper. Repeatable.",
)
@_gain_margin_option()
@_inversion_option()
@_precision_option(_DECODE_PRECISION)
@pass_options
def evaluate_cmd(
    opts: Options, run: Path, method: str, compare: tuple[str, ...], **kw: Any
) -> None:
    """Measure whether the explanation is true, faithful, realistic and disentangled.

    Autoencoder fidelity; per direction delta-p, flip rate, proximity, COUT, artifacts and
    realism (FID / KID against real target images in two offline feature spaces); sufficiency
    of the top-1..M directions together; |cos| between directions and measurements along
    alpha; ground-truth recovery and leakage when the data came with a spec. The class-mean
    reference is scored beside the directions. Writes RUN/evaluation.json and RUN/evaluation/.
    """
    from diffex.evaluate.run import EvaluateConfig, available_methods, evaluate_run
    from diffex.evaluate.table import print_evaluation

    pairs = {}
    for item in compare:
        label, sep, other = item.partition("=")
        if not sep or not label or not other:
            raise DiffexError(f"--compare takes LABEL=RUN, got {item!r}")
        pairs[label] = Path(other)
    device = opts.setup()
    cfg = EvaluateConfig(**kw, seed=opts.seed)
    methods = [method] if method != "all" else available_methods(run)
    for m in sorted(methods, key=lambda m: m == "diffex"):  # baselines first, then the comparison
        result = evaluate_run(run, cfg, device, method=m, compare=pairs if m == "diffex" else None)
        print_evaluation(result)
    click.echo(f"evaluation: {run / 'evaluation.json'}")


@cli.group(context_settings=CONTEXT)
def baseline() -> None:
    """Other explainers run on the same autoencoder and classifier, for comparison."""


@baseline.command("gcd", context_settings=CONTEXT)
@click.option(
    "--run",
    type=click.Path(path_type=Path),
    required=True,
    help="Run folder with a trained autoencoder; writes RUN/baselines/gcd/.",
)
@click.option(
    "--target",
    default=None,
    help="Class the directions should move towards [default with two classes: the second].",
)
@click.option(
    "--source-images",
    type=int,
    default=1,
    show_default=True,
    help="Validation images GCD searches on (directions from each are ranked together).",
)
@click.option("--m", "m", type=int, default=5, show_default=True, help="Directions to keep.")
@click.option(
    "--n-images",
    type=int,
    default=64,
    show_default=True,
    help="Held-out images the directions are ranked on (the global flip rate).",
)
@click.option("--ddim-steps", type=int, default=20, show_default=True, help="DDIM steps.")
@click.option(
    "--samples", type=int, default=96, show_default=True, help="Perturbations decoded per round."
)
@click.option("--rounds", type=int, default=3, show_default=True, help="Sample-and-fit rounds.")
@click.option(
    "--explain/--no-explain",
    default=True,
    show_default=True,
    help="Render the directions like DiffEx's (strips, curves, morphology).",
)
@_inversion_option()
@_precision_option(_DECODE_PRECISION)
@pass_options
def baseline_gcd(
    opts: Options, run: Path, samples: int, rounds: int, explain: bool, **kw: Any
) -> None:
    """Global Counterfactual Directions (Sobieski and Biecek, 2024) on this run's models.

    Samples perturbations of one source image's semantic latent, fits an MLP proxy of the
    classifier's target logit and a feature distance, takes gradient (g) and Hessian (h)
    directions, line-searches each step until p(target) crosses 0.5, and ranks the directions
    by their global flip rate on held-out images. Then `diffex evaluate --run RUN` scores them
    with the same metrics as DiffEx's.
    """
    from diffex.baselines.gcd import GCDConfig
    from diffex.baselines.run import GCDRunConfig, gcd_run
    from diffex.explain.explain import ExplainConfig, explain_run

    device = opts.setup()
    search = GCDConfig(samples=samples, rounds=rounds, seed=opts.seed)
    gcd_run(run, GCDRunConfig(**kw, search=search, seed=opts.seed), device)
    if explain:
        settings = ExplainConfig(
            reference=False,
            seed=opts.seed,
            precision=kw["precision"],
            inversion_refine=kw["inversion_refine"],
        )
        explain_run(run, settings, device, method="gcd")
    click.echo(f"gcd: {run / 'baselines' / 'gcd'}")


@cli.command(context_settings=CONTEXT)
@click.option(
    "--run",
    type=click.Path(path_type=Path),
    required=True,
    help="Run folder; sections whose stage has not run are left out.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to write the HTML [default: RUN/report.html].",
)
def report(run: Path, out: Path | None) -> None:
    """Write one self-contained HTML report of a run (images embedded; opens offline).

    Run summary, classifier metrics and calibration, reconstruction fidelity, the ranked
    directions with a slider over alpha per direction, curves, difference maps, per-channel
    panels and morphology tables, and the evaluation when there is one.
    """
    from diffex.report.html import build_report

    click.echo(f"report: {build_report(run, out)}")


@cli.command(context_settings=CONTEXT)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Run folder [default: runs/demo, or runs/NAME for --data NAME].",
)
@click.option(
    "--preset",
    type=click.Choice(["default", "fast", "quick", "classic"]),
    default="default",
    show_default=True,
    help="default: patched networks, an autoencoder conditioned on the classifier's features, "
    "a decoded invariance penalty, one set of directions and the legibility rule (about 15 "
    "minutes on 2 CPU cores); "
    "quick: toy sizes for tests (about a minute); classic: the default until 2026-12-08 "
    "(full-resolution autoencoder, one-step directions); fast: classic on the patched "
    "autoencoder (cpu64p) and a stride-2 classifier stem, 15 to 17.5 minutes on 2 CPU cores, "
    "but on seeds 0 to 2 its top directions also dimmed the stain on the half of the sweep "
    'away from the target (BENCHMARKS: "Patched networks").',
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Your images (folder or CSV manifest) instead of the synthetic cells.",
)
@click.option(
    "--target",
    default=None,
    help="Class to explain (with --data and more than two classes) [default: the second].",
)
@click.option(
    "--until",
    type=click.Choice(list(STAGES)),
    default="evaluate",
    show_default=True,
    help="Last stage to run (the report covers what exists).",
)
@_shared_option("z_norm", None, Z_NORM_HELP + "  [default: the preset's choice]")
@_shared_option("gain_margin", None, GAIN_MARGIN_HELP + " Rank, explain and evaluate.")
@_shared_option(
    "inversion_refine",
    None,
    INVERSION_REFINE_HELP + f" Rank, explain and evaluate [default: {INVERSION_REFINE}].",
)
@_shared_option("axis_invariance", None, AXIS_INVARIANCE_HELP + "  [default: the preset's, 0]")
@_shared_option(
    "classifier_output",
    None,
    CLASSIFIER_OUTPUT_HELP + " The autoencoder stage [default: the preset's, probs].",
)
@_shared_option("span", None, SPAN_HELP + " The directions stage.")
@_shared_option(
    "hold_area", None, HOLD_AREA_HELP + " The directions stage [default: the preset's]."
)
@_shared_option("t_edit_max", None, T_EDIT_MAX_HELP + " The directions stage.")
@click.option(
    "--alpha",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Edit size in class gaps that the directions train at and the ranking starts from "
    "[default: the preset's; 2.5 for default and fast].",
)
@_shared_option(
    "decoded_invariance",
    None,
    DECODED_INVARIANCE_HELP + " The directions stage [default: the preset's].",
)
@_shared_option(
    "decoded_core", None, DECODED_CORE_HELP + " The directions stage [default: the preset's]."
)
@_shared_option(
    "decoded_every", None, DECODED_EVERY_HELP + " The directions stage [default: the preset's]."
)
@_shared_option(
    "legible_within", None, LEGIBLE_WITHIN_HELP + " The rank stage [default: the preset's, 0]."
)
@click.option(
    "--directions-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Training steps of the directions stage [default: the preset's; 120 for default and "
    "fast].",
)
@_external_options
@pass_options
def demo(
    opts: Options,
    out: Path | None,
    preset: str,
    data: Path | None,
    target: str | None,
    until: str,
    z_norm: bool | None,
    gain_margin: float | None,
    inversion_refine: int | None,
    axis_invariance: float | None,
    classifier_output: str | None,
    span: float | None,
    hold_area: str | None,
    t_edit_max: int | None,
    decoded_invariance: float | None,
    decoded_core: float | None,
    decoded_every: int | None,
    directions_steps: int | None,
    legible_within: float | None,
    alpha: float | None,
    **kw: Any,
) -> None:
    """Run the whole pipeline and print where the results are.

    synth -> classifier -> autoencoder -> directions -> rank -> explain -> evaluate -> report,
    into OUT. With --data, your images replace the synthetic cells (no ground truth then), and
    --classifier-script/--classifier-entry explain your classifier instead of training one.
    Rerunning skips stages whose outputs exist for the same configuration, and a stage that was
    interrupted resumes from its last checkpoint; --until stops early.
    """
    from dataclasses import replace

    from diffex.pipeline import apply_overrides, demo_preset, run_demo

    spec = _external_spec(kw)
    if spec is not None and data is None:
        raise DiffexError("--classifier-script/--classifier-entry need --data")
    if out is None:
        name = "demo" if data is None else (data.parent if data.suffix else data).name
        out = Path("runs") / (name or "data")
    cfg = demo_preset(preset, opts.seed)
    cfg = apply_overrides(
        cfg,
        [
            ("--data", data, (), ""),
            ("--axis-invariance", axis_invariance, ("autoencoder",), "axis_invariance"),
            ("--classifier-output", classifier_output, ("autoencoder",), "classifier_output"),
            ("--gain-margin", gain_margin, ("rank", "explain", "evaluate"), "gain_margin"),
            (
                "--inversion-refine",
                inversion_refine,
                ("rank", "explain", "evaluate"),
                "inversion_refine",
            ),
            ("--span", span, ("directions",), "span"),
            ("--hold-area", hold_area, ("directions",), "hold_area"),
            ("--t-edit-max", t_edit_max, ("directions",), "t_edit_max"),
            ("--alpha", alpha, ("directions",), "alpha"),
            (
                "--decoded-invariance",
                decoded_invariance,
                ("directions",),
                "decoded_invariance",
            ),
            ("--decoded-core", decoded_core, ("directions",), "decoded_core"),
            ("--decoded-every", decoded_every, ("directions",), "decoded_every"),
            ("--directions-steps", directions_steps, ("directions",), "steps"),
            ("--legible-within", legible_within, ("rank",), "legible_within"),
            ("--z-norm", z_norm, ("autoencoder",), "z_norm"),
        ],
    )
    if data is not None:
        cfg = replace(cfg, data=str(data), external=spec, rank=replace(cfg.rank, target=target))
    cfg = replace(cfg, stages=cfg.stages[: cfg.stages.index(until) + 1])
    device = opts.setup()
    summary = run_demo(out, cfg, device, seed=opts.seed)
    _print_demo(summary)


def _print_demo(summary: dict[str, Any]) -> None:
    if summary.get("preset"):
        click.echo(f"preset: {summary['preset']}")
    c = summary.get("classifier", {})
    if c:
        click.echo(
            f"classifier: accuracy {c['accuracy']:.3f}, balanced {c['balanced_accuracy']:.3f}"
        )
    a = summary.get("autoencoder", {})
    for name in ("roundtrip", "semantic_only"):
        if name in a:
            m = a[name]
            click.echo(
                f"autoencoder {name}: PSNR {m['psnr']:.1f} dB, agreement {m['agreement']:.3f}"
            )
    if "rank" in summary:
        _print_ranking({**summary["rank"], "n_images": summary["rank"].get("n_images", "?")})
    for item in summary.get("explain", {}).get("items", []):
        changes = ", ".join(
            f"{t['feature']} {t['pct_change']:+.0f} % ({t['fraction_of_gap']:.1f} of gap)"
            if t["pct_change"] == t["pct_change"]
            else f"{t['feature']} ({t['fraction_of_gap']:.1f} of gap)"
            for t in item["top_changes"]
        )
        click.echo(f"  {item['name']}: {changes or 'no measured change'}")
        if item.get("imaging_drift"):
            click.echo(f"    imaging follows alpha: {'; '.join(item['imaging_drift'])}")
        if item.get("past_data"):
            click.echo(f"    past the training data: {'; '.join(item['past_data'])}")
    ev = summary.get("evaluate") or {}
    if ev:
        parts = [
            f"{label} {ev[key]:.2f}"
            for key, label in (
                ("top1_flip_rate", "top-1 flip rate"),
                ("recovery", "ground-truth recovery"),
                ("leakage", "leakage"),
            )
            if isinstance(ev.get(key), int | float)
        ]
        click.echo("evaluation: " + (", ".join(parts) or "see evaluation.json"))
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in summary.get("timings", {}).items())
    if timings:
        click.echo(f"time: {timings}")
    click.echo(f"results: {summary['out']}")
    if summary.get("report"):
        click.echo(f"report: {summary['report']}")


#: Options that take several values in a row (``--conditions A B``), as well as repeated.
VARIADIC = ("--conditions",)


def expand_variadic(argv: list[str]) -> list[str]:
    """``--conditions A B --out X`` -> ``--conditions A --conditions B --out X``."""
    out: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg in VARIADIC:
            current = arg
            continue
        if current is not None and not arg.startswith("-"):
            out += [current, arg]
            continue
        current = None
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors become one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # torchrun ... -m diffex -- ARGS passes the separator on
        argv = argv[1:]
    argv = expand_variadic(argv)
    try:
        cli.main(args=argv, prog_name="diffex", standalone_mode=False)
    except DiffexError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except OSError as exc:  # a path that cannot be read or written: name it, no traceback
        where = exc.filename if exc.filename is not None else ""
        reason = exc.strerror or str(exc)
        click.echo(f"error: {where}: {reason}" if where else f"error: {reason}", err=True)
        return 2
    except click.ClickException as exc:
        exc.show()
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return 130
    return 0


def entry() -> None:
    """``diffex`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

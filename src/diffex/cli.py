"""The ``diffex`` command line: parse, call the API, print. Errors are one line with exit code 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import click

from diffex import __version__
from diffex.errors import DiffexError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Options:
    """Global options shared by every command."""

    def __init__(self, device: str, seed: int) -> None:
        self.device_name = device
        self.seed = seed

    def setup(self) -> Any:
        """Threads, seeds and device, set once before a command computes anything."""
        from diffex.runtime import configure_threads, resolve_device, seed_everything

        configure_threads()
        seed_everything(self.seed)
        return resolve_device(self.device_name)


_pass_options = click.make_pass_decorator(Options)


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
@click.pass_context
def cli(ctx: click.Context, device: str, seed: int) -> None:
    """Explain an image classifier with a diffusion autoencoder: which visible attributes move
    its decision, shown as counterfactual images and measured in plain terms.

    Global options go before the command: diffex --device cpu --seed 1 COMMAND ...
    """
    ctx.obj = Options(device, seed)


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
            help="Epochs without improvement before stopping.",
        ),
        click.option(
            "--temperature/--no-temperature",
            default=True,
            show_default=True,
            help="Fit a calibration temperature on validation data.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@cli.command("train-classifier", context_settings=CONTEXT)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    required=True,
    help="Image folder (class = subfolder) or CSV manifest (path,label[,group]).",
)
@click.option(
    "--run",
    type=click.Path(path_type=Path),
    required=True,
    help="Run folder; writes RUN/data.json and RUN/classifier/.",
)
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
            type=click.Choice(["tiny", "cpu64", "paper128"]),
            default="cpu64",
            show_default=True,
            help="Network size: cpu64 for CPUs, paper128 is the authors' 128 px model.",
        ),
        click.option(
            "--steps", "ae_steps", type=int, default=3000, show_default=True, help="Training steps."
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
            "--classifier-output",
            type=click.Choice(["probs", "logits", "features"]),
            default="probs",
            show_default=True,
            help="Which classifier output joins the encoder's w in z_sem.",
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
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _autoencoder_config(opts: Options, **kw: Any) -> Any:
    from diffex.train.autoencoder import AutoencoderTrainConfig

    return AutoencoderTrainConfig(
        preset=kw["ae_preset"],
        steps=kw["ae_steps"],
        batch_size=kw["ae_batch_size"],
        lr=kw["ae_lr"],
        classifier_output=kw["classifier_output"],
        t_skew=kw["t_skew"],
        consistency_weight=kw["consistency_weight"],
        ddim_steps=kw["ddim_steps"],
        sample_every=kw["sample_every"],
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
    (PSNR, SSIM, classifier agreement), written to RUN/autoencoder/metrics.json with
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


@cli.command(context_settings=CONTEXT)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
    help="Run folder for the demo.",
)
@click.option(
    "--n", "n", type=int, default=3000, show_default=True, help="Number of synthetic images."
)
@click.option(
    "--size",
    type=int,
    default=48,
    show_default=True,
    help="Synthetic image size in pixels (48 keeps CPU training short).",
)
@click.option(
    "--classifier-epochs",
    type=int,
    default=20,
    show_default=True,
    help="Maximum classifier epochs.",
)
@click.option(
    "--ae-steps",
    type=int,
    default=3000,
    show_default=True,
    help="Autoencoder training steps (0 skips the autoencoder).",
)
@pass_options
def demo(
    opts: Options, out: Path, n: int, size: int, classifier_epochs: int, ae_steps: int
) -> None:
    """Run the pipeline on the built-in synthetic cells and print where the results are.

    Synthesises the benchmark into OUT/data (reused when already there), trains the classifier
    into OUT/classifier and the diffusion autoencoder into OUT/autoencoder.
    """
    from diffex.data.spec import load_spec
    from diffex.data.synth import generate
    from diffex.train.autoencoder import AutoencoderTrainConfig, train_autoencoder
    from diffex.train.classifier import ClassifierTrainConfig, train_classifier

    device = opts.setup()
    data = out / "data"
    if (data / "factors.csv").is_file():
        click.echo(f"reusing synthetic data in {data}")
    else:
        generate(load_spec(None), data, n=n, seed=opts.seed, size=size, fmt="png", overwrite=True)
        click.echo(f"synthetic data: {data} (contact sheet: {data / 'contact_sheet.png'})")
    ccfg = ClassifierTrainConfig(image_size=size, epochs=classifier_epochs, seed=opts.seed)
    _print_classifier(train_classifier(data, out, ccfg, device), out)
    if ae_steps > 0:
        acfg = AutoencoderTrainConfig(steps=ae_steps, seed=opts.seed)
        _print_autoencoder(train_autoencoder(out, acfg, device), out)
    click.echo(f"results: {out.resolve()}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors become one line on stderr and exit code 2."""
    try:
        cli.main(args=argv, prog_name="diffex", standalone_mode=False)
    except DiffexError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
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

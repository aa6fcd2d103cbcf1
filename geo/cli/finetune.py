"""``geo finetune``: fine-tune an image backbone on geotagged photos into a MODEL_DIR that
``geo build-index --backbone MODEL_DIR`` takes as it is.

The options are what a user changes from one run to the next (the photos, where the model goes, the network
to start from, how long to train, the device). The tuned constants (learning rate, batch size, frozen layers,
label smoothing, loss weights, patience, ...) are :class:`~geo.finetune.FinetuneConfig` data: changed, rarely,
in one ``--config`` file, so the command does not grow an option per constant.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import typer

from geo.cli.common import fail, print_json
from geo.cli.options import ImageRoot, Quiet
from geo.core.progress import showing
from geo.finetune import FinetuneConfig, finetune, read_config
from geo.store.bundle import bundle_containing
from geo.store.lock import writing


def _settings(config: Optional[Path], given: dict[str, Any]) -> FinetuneConfig:
    """The defaults, then the ``--config`` file (checked key by key), then the options given on the command line
    (None: not given; click checks their ranges)."""
    cfg = read_config(config) if config is not None else FinetuneConfig()
    return dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})


def finetune_command(
    manifest: Path = typer.Argument(..., help="CSV/Parquet manifest or a folder of GPS-tagged photos (as build-index)."),
    out: Path = typer.Option(..., "--out", help="MODEL_DIR to write. Re-run with the same one to resume an "
                             "interrupted run; use a new one to train with other photos or settings."),
    image_root: ImageRoot = None,
    backbone: Optional[str] = typer.Option(None, help="The network to start from (default efficientnet_lite0; "
                                           "geo backbones lists them): change it to fine-tune a larger one."),
    weights: Optional[Path] = typer.Option(None, help="When a timm:/torchvision: base cannot download its weights: "
                                           "a local weights file for it."),
    group: Optional[str] = typer.Option(None, "--group", help="When the photographer column is not called owner, "
                                        "author, user or photographer: validation holds out its whole groups."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Passes over the training photos (default 5; early "
                                         "stopping may end sooner): more for many photos, fewer for a quick look."),
    device: Optional[str] = typer.Option(None, help="auto (default) | cpu | cuda[:N]: to pick a GPU, or the CPU "
                                         "beside a busy one (bf16 autocast on CUDA)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Only to change a tuned setting (lr, batch_size, "
                                          "freeze_until, smoothing_km, partitioner, regression_weight, "
                                          "contrastive_weight, augment, patience, ...): a JSON or .toml file of "
                                          "FinetuneConfig fields. Options given here win over it."),
    quiet: Quiet = False,
    as_json: bool = typer.Option(False, "--json", help="Print the model card as JSON at the end (for scripts)."),
) -> None:
    """Fine-tune a backbone to tell places apart (cells with haversine label smoothing), validated on
    photographers it never trains on.

    \b
      geo finetune photos.csv --group owner --out my-model --epochs 6
      geo finetune photos.csv --group owner --out my-model --config settings.toml
      geo build-index photos.csv --backbone my-model --out my-index
    """
    cfg = _settings(config, {"backbone": backbone, "weights": str(weights) if weights else None,
                             "image_root": str(image_root) if image_root else None, "group_column": group,
                             "epochs": epochs, "device": device})
    if (inside := bundle_containing(out / "x")) is not None:
        fail(f"--out {out} is inside the bundle {inside}: write the model elsewhere")
    log = (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))
    with writing(out, log), showing(bars=not quiet):
        card = finetune(str(manifest), out, cfg, log=log)
    if as_json:
        print_json(card)
        return
    v = card["validation"]
    b, f = v["base"], v["best"]
    typer.echo(f"wrote {out}: best epoch {v['best_epoch']}; on {card['training']['validation']} photos of held-out "
               f"photographers, located by kNN among the training photos: median {b['knn_median_km']:.0f} -> "
               f"{f['knn_median_km']:.0f} km, within 750 km {b['knn_acc_750km']:.1%} -> {f['knn_acc_750km']:.1%}. "
               f"Build with --backbone {out}")


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)

"""``geo finetune``: fine-tune an image backbone on geotagged photos into a MODEL_DIR that
``geo build-index --backbone MODEL_DIR`` takes as it is."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from geo.cli.common import fail, print_json
from geo.core.progress import showing
from geo.finetune import FinetuneConfig, finetune
from geo.store.bundle import bundle_containing
from geo.store.lock import writing


def finetune_command(
    manifest: Path = typer.Argument(..., help="CSV/Parquet manifest or a folder of GPS-tagged photos (as build-index)."),
    out: Path = typer.Option(..., "--out", help="MODEL_DIR to write (resumed when it holds a checkpoint of this run)."),
    image_root: Optional[Path] = typer.Option(None, help="Folder that relative image paths start from."),
    backbone: str = typer.Option("efficientnet_lite0", help="The network to start from (geo backbones lists them)."),
    weights: Optional[Path] = typer.Option(None, help="Local weights for timm:/torchvision: bases."),
    group: Optional[str] = typer.Option(None, "--group", help="Photographer column: validation holds out whole "
                                        "groups (default: owner/author/user/photographer when present)."),
    epochs: int = typer.Option(5, help="Passes over the training photos (early stopping may end sooner)."),
    batch_size: int = typer.Option(32, help="Photos per step."),
    lr: float = typer.Option(1e-4, help="Backbone learning rate (AdamW); the cell heads use 10x."),
    freeze_until: Optional[str] = typer.Option(None, help="Keep parameters before the first whose name starts with "
                                               "this fixed, e.g. blocks.4 for EfficientNet-Lite0 (faster on CPU)."),
    smoothing_km: float = typer.Option(75.0, help="Haversine label smoothing scale (PIGEON's tau)."),
    partitioner: str = typer.Option("adaptive", help="Cells to classify into: adaptive (S2, PlaNet) | semantic "
                                    "(PIGEON: country borders, then where photos cluster)."),
    regression_weight: float = typer.Option(0.0, help="Weight of a coordinate-regression term (0: off)."),
    contrastive_weight: float = typer.Option(0.0, help="Weight of GeoCLIP's image-to-GPS contrastive term against "
                                             "its published location encoder (0: off)."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random flips and crops while training."),
    patience: int = typer.Option(2, help="Stop after this many epochs without a better validation loss."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (bf16 autocast on CUDA)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or log lines."),
    as_json: bool = typer.Option(False, "--json", help="Print the model card as JSON at the end."),
) -> None:
    """Fine-tune a backbone to tell places apart (cells with haversine label smoothing), validated on
    photographers it never trains on.

    \b
      geo finetune photos.csv --group owner --out my-model --epochs 5 --freeze-until blocks.4
      geo build-index photos.csv --backbone my-model --out my-index
    """
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--patience", patience)):
        if value < 1:
            fail(f"{name} must be at least 1, not {value}")
    if lr <= 0 or smoothing_km <= 0 or regression_weight < 0 or contrastive_weight < 0:
        fail("--lr and --smoothing-km must be positive, --regression-weight and --contrastive-weight not negative")
    if partitioner not in ("adaptive", "semantic"):
        fail(f"--partitioner takes adaptive or semantic, not {partitioner!r} (bottomup ranks cells by embeddings, "
             "which change while fine-tuning)")
    if (inside := bundle_containing(out / "x")) is not None:
        fail(f"--out {out} is inside the bundle {inside}: write the model elsewhere")
    cfg = FinetuneConfig(backbone=backbone, weights=str(weights) if weights else None,
                         image_root=str(image_root) if image_root else None, group_column=group, epochs=epochs,
                         batch_size=batch_size, lr=lr, freeze_until=freeze_until, smoothing_km=smoothing_km,
                         partitioner=partitioner, regression_weight=regression_weight, contrastive_weight=contrastive_weight,
                         augment=augment, patience=patience, device=device)
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

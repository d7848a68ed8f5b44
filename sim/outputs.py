"""The run folder's figures and report.md, drawn from its tidy tables (results.csv,
per_image.csv, curves.csv) after the units have run, so a resumed run redraws everything."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from common.inference import describe
from common.settings import PROTOCOL_GROUPS, Settings, SimConfig
from sim import plots
from sim.protocols import PlannedUnit, selection_rule
from sim.public import public_recipe
from sim.report import ReportContext, matrix_table, write_report
from sim.report_dp import epsilon_points
from sim.runfolder import SimRunFolder


def make_figures(folder: SimRunFolder, results: pd.DataFrame, per_image: pd.DataFrame, curves: pd.DataFrame,
                 opts: SimConfig, preferred_examples: Sequence[str]) -> list[tuple[str, str]]:
    """Draw every figure the run's tables support; returns (file name, caption) pairs."""
    out: list[tuple[str, str]] = []

    def keep(path: Path | None, caption: str) -> None:
        if path is not None:
            out.append((path.name, caption))

    p = folder.path
    keep(plots.dice_boxplot(per_image, ["paper"], p / "dice_box_paper.png",
                            "Protocol 1: per-image Dice on external centres, per arm"),
         "Per-centre Dice (lesion images), paper protocol")
    federated = list(PROTOCOL_GROUPS["federated"])
    keep(plots.dice_boxplot(per_image, [*federated, "pooled"], p / "dice_box_federated.png",
                            "Protocol 2: Dice on the held-out centre"),
         "Per-centre Dice (lesion images), federated leave-one-centre-out and pooled")
    for name, protocols in (("paper", ["paper"]), ("federated", federated),
                            ("reference", ["local", "pooled"])):
        keep(plots.training_curves(curves, protocols, p / f"curves_{name}.png", f"Training curves: {name}"),
             f"Training loss and validation Dice per epoch/round ({name})")
    keep(plots.epsilon_utility(epsilon_points(results), p / "epsilon_utility.png",
                               "Dice and AUC against the DP-SGD budget ε"),
         "Utility against ε (sample-level DP-SGD; ∞: the same arm without DP)")
    for arm in opts.fed_arms:
        keep(plots.heatmap(matrix_table(results, "local", "dice", arm), p / f"heatmap_local_{arm}.png",
                           f"Local-only, arm {arm}: train on row, test on column (diagonal: own test split)"),
             f"Train-on-row / test-on-column Dice, arm {arm}")
    for key in preferred_examples:
        npz = folder.examples_dir / f"{key}.npz"
        if npz.is_file():
            with np.load(npz, allow_pickle=False) as z:
                ex = {k: z[k] for k in z.files}
            keep(plots.example_overlays(ex, p / "examples.png", f"Examples: {key}"),
                 f"Example predictions ({key}) with p̂, φ and the BI-RADS features of the predicted mask")
            break
    return out


def write_outputs(folder: SimRunFolder, settings: Settings, centres: pd.DataFrame,
                  plan: Sequence[PlannedUnit]) -> Path:
    cfg, opts, fed = settings.experiment, settings.sim, settings.federation
    results, per_image, curves = folder.read("results"), folder.read("per_image"), folder.read("curves")
    preferred = [pu.unit.key for pu in plan if pu.unit.arm == "consistency"] + [pu.unit.key for pu in plan]
    figures = make_figures(folder, results, per_image, curves, opts, preferred)
    table = {
        "image size": f"{cfg.data.image_size} px", "model": f"{cfg.model.arch} (base {cfg.model.base_channels}, depth {cfg.model.depth})",
        "centralised epochs": cfg.train.epochs, "federated rounds × local epochs": f"{fed.rounds} × {fed.local_epochs}",
        "FedProx μ": fed.proximal_mu, "consistency λ": cfg.loss.consistency, "prior features": ", ".join(cfg.loss.features),
        "seeds": ", ".join(map(str, opts.seeds)), "validation fraction": cfg.data.val_fraction,
        "bootstrap resamples": opts.bootstrap, "model selection": opts.selection,
        "prediction": describe(cfg.inference) + ("; paper protocol: the mean of the seeds' models is scored "
                                                  "as arm <arm>-ens" if cfg.inference.ensemble else ""),
    }
    masks = cfg.data.mask_fraction, cfg.data.label_fraction
    if masks != (1.0, 1.0):
        table["training annotations kept"] = f"masks {masks[0]:g}, labels {masks[1]:g} (by patient)"
    if opts.label_only_centres:
        table["labels only (training masks hidden)"] = ", ".join(opts.label_only_centres)
    if opts.public_centres:
        epochs, lr = public_recipe(opts, cfg.train)
        table["public → private"] = (f"pretrained without DP on {', '.join(opts.public_centres)} "
                                     f"({epochs} epochs, lr {lr:g}); DP-SGD trains {cfg.privacy.trainable}")
    if opts.epsilons:
        p = cfg.privacy
        table["DP-SGD arms"] = (f"{', '.join(opts.dp_arms)} at ε ∈ {{{', '.join(f'{e:g}' for e in opts.epsilons)}}}, "
                                   f"δ = {p.target_delta:g}, clip C = {p.max_grad_norm:g}, accountant {p.accountant}, "
                                   f"batch {cfg.train.batch_size} (Poisson)")
    if cfg.privacy.enabled:
        p = cfg.privacy
        sigma = "σ planned for the target" if p.noise_multiplier is None else f"σ {p.noise_multiplier:g}"
        table["DP-SGD on every arm"] = (f"target ε {p.target_epsilon:g} ({sigma}), δ = {p.target_delta:g}, "
                                        f"clip C = {p.max_grad_norm:g}, trains {p.trainable}; ε spent: "
                                        "the epsilon rows of results.csv")
    ctx = ReportContext(
        run_name=folder.path.name,
        data_source=opts.data_root or "embedded synthetic centres (common.data.synthetic)",
        centres=centres, settings=table, selection_rule=selection_rule(opts.selection),
        hd95_unit="pixels at the model input size (hd95_mm rows in results.csv where the spacing is known)",
        figures=tuple(figures), synthetic=not opts.data_root,
    )
    return write_report(folder.path / "report.md", results, per_image, ctx)

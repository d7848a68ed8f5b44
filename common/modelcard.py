"""The model card: what a model file is for, what it was trained on, how well it did and where it
fails, written beside the model as ``<model>.card.md`` (people) and ``<model>.card.json`` (tools),
plus ``<model>.reliability.png`` when an evaluation with calibration is known.

Everything comes from the model file's metadata (``common.modelfile.build_metadata``) and, when
the caller has scored the model, an evaluation: per-centre metric rows (Dice, AUC with CIs) and the
per-image malignancy probabilities with their labels, from which Brier score, ECE and the
reliability bins are computed here (``common.metrics``). A temperature-calibrated model
(``common.calibration``) also gets the uncalibrated probabilities' Brier score and ECE ("before"),
and the card says how its temperature was fitted.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common import metrics
from common.atomic import atomic_write

CARD_FORMAT = "fedbus-model-card/1"
#: Bins of the reliability diagram and of the ECE.
N_BINS = 10
#: Below this absolute weight (per standard deviation) a feature is said to have little effect.
SMALL_WEIGHT = 0.05

INTENDED_USE = ("Research on federated breast-ultrasound lesion segmentation and malignancy "
                "estimation: reproducing, comparing and validating models on retrospective data.")
NOT_FOR = ("Not a diagnostic device and not cleared or approved as one. Not for clinical decisions "
           "about any patient, for screening, or for replacing a radiologist's reading. Outputs on "
           "images unlike the training centres' (other scanners, presets, lesion types) are unvalidated.")

#: What a larger value of each BI-RADS feature means clinically (with ``CLINICAL_SIGN`` +1).
FEATURE_WORDS: dict[str, str] = {
    "area": "a larger lesion",
    "roughness": "a rougher, less smooth outline",
    "compactness": "a less compact, more irregular shape",
    "texture": "a more heterogeneous interior",
    "orientation": "a taller-than-wide orientation",
    "margin_sharpness": "a sharper, more circumscribed margin",
    "posterior": "posterior acoustic shadowing",
}

#: Failures measured on Lite0-recipe models (``model.arch`` lite0), with the lab entry that measured them.
LITE0_FAILURES: tuple[dict[str, str], ...] = (
    {"title": "Lesions off mid-width",
     "text": ("On BUSI, lesions whose centre lies 0.2 or more of the width from mid-width (about a fifth "
              "of its lesions) hold most segmentation failures (34 of 46): Dice about 0.3-0.55 there "
              "against 0.77-0.79 at mid-width; the mask sits on a dark structure mid-width instead."),
     "lab": "docs/lab/2026-12-04-lateral-roll.md"},
    {"title": "Near-field fat lobules mistaken for lesions",
     "text": ("On deeper scans (BUSI, BUS-UCLM) the mask can sit on a hypoechoic fat lobule just under "
              "the skin while the true lesion lies lower in the image; Dice is lower for lesions whose "
              "centre is below 40 % of the image height."),
     "lab": "docs/lab/2026-12-03-detection-gap-near-field-splice.md"},
)


def card_paths(model_path: str | Path) -> dict[str, Path]:
    """{"md", "json", "png"}: the card's files beside ``model_path`` (``x.pt`` → ``x.card.md``, ...)."""
    path = Path(model_path)
    stem = path.with_suffix("")
    return {"md": Path(f"{stem}.card.md"), "json": Path(f"{stem}.card.json"),
            "png": Path(f"{stem}.reliability.png")}


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def centre_evaluation(centre: str, rows: Iterable[Mapping[str, Any]], malignant: Sequence[float] | None = None,
                      p_malignant: Sequence[float] | None = None, n_bins: int = N_BINS,
                      p_uncalibrated: Sequence[float] | None = None) -> dict[str, Any]:
    """One test centre's evaluation. ``rows``: tidy metric rows (metric, value, ci_low, ci_high,
    n) as the simulation's ``metric_rows`` writes; ``malignant``/``p_malignant`` (N,): labels and
    probabilities for calibration (left out when None, e.g. an untrained classification head);
    ``p_uncalibrated`` (N,): the same model's probabilities at temperature 1 (Brier/ECE before)."""
    out: dict[str, Any] = {"centre": centre, "metrics": {}}
    for r in rows:
        if r.get("metric") in ("dice", "auc"):
            out["metrics"][str(r["metric"])] = {k: _finite(r.get(k)) for k in ("value", "ci_low", "ci_high")} \
                | {"n": int(r.get("n") or 0)}
    if malignant is not None and p_malignant is not None:
        bins = metrics.reliability_bins(malignant, p_malignant, n_bins)
        out["calibration"] = {
            "brier": _finite(metrics.brier_score(malignant, p_malignant)),
            "ece": _finite(metrics.expected_calibration_error(malignant, p_malignant, n_bins)),
            "n_bins": n_bins, "n": sum(b["count"] for b in bins),
            "bins": [{k: (_finite(v) if k in ("mean_p", "observed") else v) for k, v in b.items()} for b in bins]}
        if p_uncalibrated is not None:
            out["calibration"]["brier_raw"] = _finite(metrics.brier_score(malignant, p_uncalibrated))
            out["calibration"]["ece_raw"] = _finite(metrics.expected_calibration_error(malignant, p_uncalibrated, n_bins))
    return out


def learned_prior(prior: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each prior feature's effective weight (per standard deviation of the training features),
    strongest first, with its clinical direction and a sentence saying what the model learned."""
    signs = prior.get("clinical_sign", {})
    out = []
    for name, w in sorted(prior.get("weights", {}).items(), key=lambda kv: -abs(kv[1])):
        sign = int(signs.get(name, 1))
        larger = FEATURE_WORDS.get(name, f"a larger {name}")
        clinical = "raises" if sign > 0 else "lowers"
        if not math.isfinite(w):
            words = "not learned (the weight is not a finite number)"
        elif abs(w) < SMALL_WEIGHT:
            words = f"little effect: {larger} barely moves the malignancy prior"
        else:
            learned = "raises" if w > 0 else "lowers"
            agree = "as BI-RADS expects" if (w > 0) == (sign > 0) else "against the BI-RADS direction"
            words = f"{larger} {learned} the malignancy prior ({agree})"
        out.append({"feature": name, "weight": float(w), "clinical_direction": clinical, "summary": words})
    return out


def privacy_statement(meta: Mapping[str, Any]) -> dict[str, Any]:
    """ε, δ and what they protect, or that the run has no formal guarantee."""
    priv = meta.get("privacy") or {}
    federated = (meta.get("source") or {}).get("kind") == "deployment" or bool((meta.get("source") or {}).get("federated"))
    stats = "; the training lesions' feature percentiles in the model file are NOT covered" \
        if meta.get("feature_stats") else ""
    if priv.get("dp_sgd"):
        eps = _finite(priv.get("epsilon"))
        text = (f"DP-SGD (example-level differential privacy): ε = {eps:.3g}, δ = {priv.get('delta')} "
                "(the largest ε any trainer spent). Protected: whether any one training image took part "
                f"in training, against anyone who sees the weights{stats}. The centres and counts below "
                "are not protected." if eps is not None else
                "DP-SGD was configured but the ε spent is unknown: treat as no formal privacy guarantee.")
        return {"guarantee": eps is not None, "epsilon": eps, "delta": priv.get("delta"), "text": text}
    where = ("images stayed at their sites (federated), but" if federated else "images were pooled by one trainer, and")
    return {"guarantee": False, "epsilon": None, "delta": None,
            "text": f"No formal privacy guarantee: {where} the weights may reveal information about training images."}


def calibration_statement(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The malignancy temperature, how it was fitted and what that means, in one sentence."""
    cal = dict(meta.get("calibration") or {})
    if "temperatures" in cal:  # an ensemble
        temps = ", ".join(f"{t:.3g}" for t in cal["temperatures"])
        return {**cal, "text": f"Each member's malignancy logit is divided by its own temperature ({temps}) "
                               "before the members' probabilities are averaged."}
    t = _finite(meta.get("temperature")) or 1.0
    if not cal:
        return {"temperature": t, "text": ("Not calibrated: the malignancy probability is the network's own "
                                           "(temperature 1); temperature scaling is fitted only on held-out "
                                           "validation images, and this run kept none."
                                           if t == 1.0 else f"Temperature {t:.3g}.")}
    split = str(cal.get("split", ""))
    where = ", ".join(f"{c} ({n})" for c, n in (cal.get("centres") or {}).items()) or "—"
    if not cal.get("fitted", True):
        return {**cal, "temperature": t, "text": (f"Not calibrated: only {cal.get('n', 0)} images in the {split} "
                                                  f"split of the training centres ({where}); temperature 1.")}
    text = (f"Temperature scaling: the malignancy logit is divided by T = {t:.3g}, fitted by minimising the "
            f"log-loss on the {split} split of the training centres ({where}; {cal.get('n', 0)} images"
            f"{', statistics summed across sites, no image left its site' if cal.get('federated') else ''}); "
            f"mean log-loss there {_num(cal.get('nll_before'))} at T = 1, {_num(cal.get('nll_after'))} at T. "
            "AUC and decisions at threshold 0.5 are unchanged.")
    if (meta.get("privacy") or {}).get("dp_sgd"):
        text += " The temperature is not covered by the DP-SGD guarantee."
    return {**cal, "temperature": t, "text": text}


def build_card(meta: Mapping[str, Any], evaluation: Sequence[Mapping[str, Any]] | None = None,
               evaluation_note: str = "") -> dict[str, Any]:
    """The card (JSON-ready) of a model file's metadata ``meta`` and, optionally, ``evaluation``:
    ``centre_evaluation`` dicts; ``evaluation_note`` says what the centres are (external, internal)."""
    exp = meta.get("experiment") or {}
    arch = (exp.get("model") or {}).get("arch")
    prov = meta.get("provenance") or {}
    return {
        "format": CARD_FORMAT, "model": meta.get("name"), "description": meta.get("description", ""),
        "intended_use": INTENDED_USE, "not_for": NOT_FOR,
        "preset": (meta.get("source") or {}).get("preset") or exp.get("preset") or meta.get("description", ""),
        "source": dict(meta.get("source") or {}),
        "architecture": arch,
        "training_data": dict(meta.get("data") or {}),
        "preprocessing": dict(meta.get("preprocessing") or {}),
        "inference": dict(meta.get("inference") or {}),
        "learned_prior": learned_prior(meta.get("prior") or {}),
        "privacy": privacy_statement(meta),
        "calibration": calibration_statement(meta),
        "evaluation": {"note": evaluation_note, "centres": [dict(e) for e in evaluation]} if evaluation else None,
        "failure_modes": [dict(f) for f in LITE0_FAILURES] if arch == "lite0" else [],
        "versions": dict(prov.get("versions") or {}), "commit": prov.get("git_commit"),
        "written_utc": prov.get("time_utc"),
    }


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None (strict JSON: no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _num(x: Any, fmt: str = ".3f") -> str:
    v = _finite(x)
    return "n/a" if v is None else format(v, fmt)


def _metric_cell(m: Mapping[str, Any] | None) -> str:
    if not m:
        return "—"
    ci = f" ({_num(m.get('ci_low'))}–{_num(m.get('ci_high'))})" if _finite(m.get("ci_low")) is not None else ""
    return f"{_num(m.get('value'))}{ci}, n={m.get('n', 0)}"


def _before_after(cal: Mapping[str, Any], key: str) -> str:
    if f"{key}_raw" not in cal:
        return _num(cal.get(key))
    return f"{_num(cal.get(f'{key}_raw'))} → {_num(cal.get(key))}"


def render_markdown(card: Mapping[str, Any], png_name: str | None = None) -> str:
    """The card as Markdown; ``png_name``: the reliability diagram beside it, when written."""
    lines = [f"# Model card: {card.get('model')}", ""]
    if card.get("description"):
        lines += [str(card["description"]), ""]
    lines += ["## Intended use", "", str(card["intended_use"]), "", "## Not for", "", str(card["not_for"]), ""]
    src = card.get("source") or {}
    lines += ["## Model", "", f"- preset / description: {card.get('preset') or '—'}",
              f"- architecture: {card.get('architecture')}",
              f"- source: {', '.join(f'{k}={v}' for k, v in src.items() if v not in ('', None)) or '—'}"]
    pre = card.get("preprocessing") or {}
    lines.append(f"- preprocessing: {pre.get('image_size')} px, {pre.get('normalisation', '')}")
    inf = card.get("inference") or {}
    lines += [f"- inference: {', '.join(f'{k}={v}' for k, v in inf.items())}", ""]
    centres = (card.get("training_data") or {}).get("centres") or {}
    lines += ["## Training data", "", "| centre | train | val |", "|---|---|---|"]
    lines += [f"| {c} | {n.get('train', '—')} | {n.get('val', '—')} |" for c, n in centres.items()] or ["| — | | |"]
    lines += ["", "Counts only; no file names or patient data are kept in the model file.", ""]
    lines += ["## What this model learned about malignancy", "",
              ("The BI-RADS prior's effective weight per feature (per standard deviation of the training "
               "lesions' feature), strongest first:"), "",
              "| feature | weight | clinically, a larger value | learned |", "|---|---|---|---|"]
    lines += [f"| {p['feature']} | {_num(p['weight'], '+.3f')} | {p['clinical_direction']} malignancy risk | {p['summary']} |"
              for p in card.get("learned_prior") or []] or ["| — | | | |"]
    priv = card.get("privacy") or {}
    lines += ["", "## Privacy", "", str(priv.get("text", "")), ""]
    lines += ["## Calibration", "", str((card.get("calibration") or {}).get("text", "")), ""]
    ev = card.get("evaluation")
    lines += ["## Evaluation", ""]
    if not ev:
        lines += [("No evaluation recorded with this model: validate it on your own data "
                   "(`fedbus-predict MODEL manifest.csv --out DIR` writes metrics.csv)."), ""]
    else:
        if ev.get("note"):
            lines += [str(ev["note"]), ""]
        both = any("ece_raw" in (c.get("calibration") or {}) for c in ev["centres"])
        brier, ece = ("Brier (T = 1 → T)", "ECE, 10 bins (T = 1 → T)") if both else ("Brier", "ECE (10 bins)")
        lines += [f"| centre | Dice (95 % CI) | AUC (95 % CI) | {brier} | {ece} |", "|---|---|---|---|---|"]
        for c in ev["centres"]:
            cal = c.get("calibration") or {}
            cells = [_before_after(cal, k) if both else _num(cal.get(k)) for k in ("brier", "ece")]
            lines.append(f"| {c['centre']} | {_metric_cell(c['metrics'].get('dice'))} | "
                         f"{_metric_cell(c['metrics'].get('auc'))} | {cells[0]} | {cells[1]} |")
        lines.append("")
        if png_name:
            lines += [f"![reliability diagram]({png_name})", ""]
    lines += ["## Known failure modes", ""]
    fails = card.get("failure_modes") or []
    lines += [f"- **{f['title']}** ({f['lab']}): {f['text']}" for f in fails] or \
        ["None measured for this architecture; the measured failures in docs/lab concern Lite0-recipe models."]
    vers = card.get("versions") or {}
    lines += ["", "## Versions", "", f"- commit: {card.get('commit') or 'unknown'}",
              f"- written: {card.get('written_utc') or 'unknown'}",
              *(f"- {k}: {v}" for k, v in vers.items()), ""]
    return "\n".join(lines)


def plot_reliability(evaluation: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Reliability diagram (observed fraction malignant vs mean p̂ per bin, one line per centre)
    to ``path``; None when no centre has calibration."""
    cal = [(c["centre"], c["calibration"]) for c in evaluation if c.get("calibration")]
    if not cal:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    for centre, c in cal:
        pts = [(b["mean_p"], b["observed"]) for b in c["bins"] if b["count"] and b["mean_p"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{centre} (ECE {_num(c.get('ece'))})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted p(malignant)", ylabel="observed fraction malignant",
           title="Reliability")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100), binary=True, mode=None)
    finally:
        plt.close(fig)
    return path


def write_card(model_path: str | Path, meta: Mapping[str, Any],
               evaluation: Sequence[Mapping[str, Any]] | None = None, evaluation_note: str = "") -> dict[str, Path]:
    """Write the card of the model at ``model_path`` (metadata ``meta``) beside it, atomically;
    a stale reliability diagram is removed when there is no calibration. Returns the paths written."""
    paths = card_paths(model_path)
    card = build_card(meta, evaluation, evaluation_note)
    png = plot_reliability(evaluation or [], paths["png"])
    if png is None:
        paths["png"].unlink(missing_ok=True)
    text = json.dumps(_json_safe(card), indent=1, allow_nan=False)
    atomic_write(paths["json"], lambda fh: fh.write(text), mode=None)
    md = render_markdown(card, paths["png"].name if png else None)
    atomic_write(paths["md"], lambda fh: fh.write(md), mode=None)
    return {k: v for k, v in paths.items() if k != "png" or png}

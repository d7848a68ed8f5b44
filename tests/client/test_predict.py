"""fedbus-predict (client/predict.py) on a smoke-sized model: files, a folder and a manifest
in, masks at the images' own size, overlays, predictions.csv and metrics.csv out; bad inputs
named and skipped; a tampered model refused; the ONNX export equal to the PyTorch graph."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client.predict import main
from common.config import ALL_FEATURES, replace
from common.federation import build_experiment_model
from common.loaded_model import load_model, write_ensemble
from common.modelfile import feature_stats, save_model
from common.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
CFG = load_settings("smoke").experiment
SIZES = [(64, 48), (40, 40), (50, 70)]  # (width, height): none at the model's 32 px


def lesion_image(w: int, h: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A speckled uint8 (h,w) image with a dark ellipse, and its bool mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 5)) ** 2 <= 1
    img = np.clip(rng.normal(140, 25, (h, w)) - 90 * mask, 0, 255).astype(np.uint8)
    return img, mask


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = build_experiment_model(CFG).eval()
    pairs = [lesion_image(32, 32, s) for s in range(6)]
    images = torch.tensor(np.stack([p[0] for p in pairs]), dtype=torch.float32)[:, None] / 255
    masks = torch.tensor(np.stack([p[1] for p in pairs]), dtype=torch.float32)[:, None]
    path = tmp_path_factory.mktemp("model") / "smoke.pt"
    return save_model(path, net, CFG, name="smoke", stats=feature_stats(images, masks))


@pytest.fixture()
def images(tmp_path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    out = []
    for i, (w, h) in enumerate(SIZES):
        img, mask = lesion_image(w, h, 10 + i)
        Image.fromarray(img).save(folder / f"case{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / f"case{i}_mask.png")
        out.append(folder / f"case{i}.png")
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def run(*args: object) -> int:
    return main([str(a) for a in args] + ["--no-progress", "--bootstrap", "50"])


def test_files_give_masks_at_their_own_size_overlays_and_one_row_each(model_file, images, tmp_path) -> None:
    out = tmp_path / "out"
    assert run(model_file, *images[:2], "--out", out, "--spacing-mm", 0.1, "--batch-size", 1) == 0
    rows = read_csv(out / "predictions.csv")
    assert [r["image"] for r in rows] == [str(p) for p in images[:2]]
    for row, (w, h) in zip(rows, SIZES):
        mask = np.asarray(Image.open(out / row["mask_file"]))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert (int(row["width"]), int(row["height"])) == (w, h)
        assert int(row["lesion_area_px"]) == int((mask > 0).sum())
        assert float(row["lesion_area_mm2"]) == pytest.approx(int(row["lesion_area_px"]) * 0.01)
        assert row["no_lesion"] == str(int(not mask.any())) and 0 <= float(row["p_malignant"]) <= 1
        overlay = Image.open(out / row["overlay_file"])
        assert overlay.mode == "RGB" and overlay.height > h  # the text panel below the image
        if row["no_lesion"] == "0":
            assert 0 < float(row["phi"]) < 1 and len(row["top_features"].split(";")) == 3
            assert all(0 <= float(row[f"{n}_pct"]) <= 100 for n in ALL_FEATURES)
    assert not (out / "metrics.csv").exists()  # nothing to score against


def test_a_folder_is_searched_recursively_and_names_stay_unique(model_file, images, tmp_path) -> None:
    sub = images[0].parent / "again"
    sub.mkdir()
    (sub / "case0.png").write_bytes(images[0].read_bytes())  # same name in a subfolder
    (images[0].parent / "notes.txt").write_text("not an image, not a candidate")
    out = images[0].parent / "predicted"  # inside the input folder: not an input the next time
    assert run(model_file, images[0].parent, "--out", out, "--batch-size", 2) == 0
    assert run(model_file, images[0].parent, "--out", out, "--batch-size", 2) == 0
    rows = read_csv(out / "predictions.csv")
    assert sorted(r["mask_file"] for r in rows) == ["masks/again__case0.png", "masks/case0.png",
                                                    "masks/case1.png", "masks/case2.png"]
    assert all(r["lesion_area_mm2"] == "" for r in rows)  # no spacing known
    same = [r for r in rows if r["mask_file"].endswith("case0.png")]
    assert float(same[0]["p_malignant"]) == pytest.approx(float(same[1]["p_malignant"]), abs=1e-6)


def test_a_manifest_with_masks_and_labels_is_scored(model_file, images, tmp_path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,label,mask,spacing_mm\n"
                        "images/case0.png,malignant,case0_mask.png,0.2\n"
                        "images/case1.png,benign,case1_mask.png,\n"
                        "images/case2.png,normal,,\n")
    out = tmp_path / "out"
    assert run(model_file, manifest, "--out", out) == 0
    rows = read_csv(out / "predictions.csv")
    assert [r["label"] for r in rows] == ["malignant", "benign", "normal"]
    assert rows[0]["lesion_area_mm2"] != "" and rows[1]["lesion_area_mm2"] == ""
    truth = np.asarray(Image.open(tmp_path / "case0_mask.png")) > 0
    pred = np.asarray(Image.open(out / rows[0]["mask_file"])) > 0
    assert float(rows[0]["dice"]) == pytest.approx(2 * (truth & pred).sum() / (truth.sum() + pred.sum()))
    assert rows[2]["dice"] == ""  # a normal image has no Dice
    metrics = {r["metric"]: r for r in read_csv(out / "metrics.csv")}
    assert set(metrics) == {"dice", "auc", "sensitivity", "specificity"}
    assert metrics["dice"]["n"] == "2" and metrics["auc"]["n"] == "3" and metrics["specificity"]["n"] == "2"
    dice_mean = np.mean([float(rows[0]["dice"]), float(rows[1]["dice"])])
    assert float(metrics["dice"]["value"]) == pytest.approx(dice_mean)
    assert float(metrics["dice"]["ci_low"]) <= dice_mean <= float(metrics["dice"]["ci_high"])
    p = [float(r["p_malignant"]) for r in rows]  # one malignant against two others
    by_hand = np.mean([1.0 if p[0] > q else 0.5 if p[0] == q else 0.0 for q in p[1:]])
    assert float(metrics["auc"]["value"]) == pytest.approx(by_hand)


def test_malformed_manifest_rows_are_named_like_the_site_reader_names_them(model_file, images, tmp_path,
                                                                           capsys) -> None:
    from common.data import IssueLog
    from common.data.manifest import read_manifest

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("Image;Label;Spacing_MM\n"  # the site reader's column aliases and ';'
                        "images/case0.png;unsure;\n"
                        "images/case1.png;benign;-2\n"
                        ";normal;\n"
                        "../outside.png;;\n"
                        "images/case2.png;;\n")
    out = tmp_path / "out"
    assert run(model_file, manifest, "--out", out) == 1  # four rows skipped, one predicted
    skipped = [ln.removeprefix("fedbus-predict: skipped ")
               for ln in capsys.readouterr().err.splitlines() if ln.startswith("fedbus-predict: skipped")]
    log = IssueLog("site", manifest)
    read_manifest(manifest, log)  # the site's own reading of the same file
    site = [f"{i.path}: {i.message}" for i in log.issues]
    assert skipped == site[:4]  # the same words; the site also wants a label or a mask in row 6
    assert skipped[0].startswith(f"{tmp_path / 'images' / 'case0.png'}: manifest.csv row 2: ")
    assert skipped[3].startswith(f"{manifest}: row 5: path(s) ") and "outside" in skipped[3]
    assert [s.split(": ")[1].split(":")[0] for s in skipped] == [
        "manifest.csv row 2", "manifest.csv row 3", "row 4", "row 5"]
    assert site[4].endswith("manifest.csv row 6: neither a mask nor a label; give at least one")
    rows = read_csv(out / "predictions.csv")
    assert [r["image"] for r in rows] == [str(images[2])] and "label" not in rows[0]


def test_bad_inputs_are_named_on_one_line_and_skipped(model_file, images, tmp_path, capsys, monkeypatch) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "truncated.png").write_bytes(images[0].read_bytes()[:200])
    (bad / "text.png").write_text("hello")
    os.mkfifo(bad / "pipe.png")
    big = bad / "bomb.png"
    Image.new("L", (300, 300)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 90 000 px: over twice the limit
    inputs = [images[1], bad / "truncated.png", bad / "text.png", bad / "pipe.png", big, bad / "absent.png"]
    out = tmp_path / "out"
    assert run(model_file, *inputs, "--out", out) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for name, why in (("truncated.png", "cannot decode"), ("text.png", "not a readable image"),
                      ("pipe.png", "not a regular file"), ("bomb.png", "too many pixels"),
                      ("absent.png", "no such file")):
        (line,) = [ln for ln in err.splitlines() if name in ln]
        assert line.startswith("fedbus-predict: skipped") and why in line
    assert [r["image"] for r in read_csv(out / "predictions.csv")] == [str(images[1])]
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_a_tampered_model_is_refused_before_any_output(model_file, images, tmp_path, capsys) -> None:
    payload = torch.load(model_file, weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = payload["state_dict"][key] * 1.01
    torch.save(payload, tmp_path / "tampered.pt")
    assert run(tmp_path / "tampered.pt", images[0], "--out", tmp_path / "out") == 2
    assert "SHA-256 mismatch" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_onnx_export_matches_pytorch_and_predicts_alone(model_file, images, tmp_path, capsys) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from common.predictgraph import build_graph, export_onnx
    from common.prediction import OnnxBackend

    onnx_path = tmp_path / "smoke.onnx"
    assert run("--export", "onnx", model_file, onnx_path) == 0
    assert "max abs diff" in capsys.readouterr().out
    # an ensemble with test-time views exports the same way, within 1e-4 of torch
    views = replace(CFG.inference, flip=True, depth_shifts=(0.25,), ensemble=True)
    ens = write_ensemble(tmp_path / "ens.yaml", [model_file, model_file], views)
    assert export_onnx(load_model(ens), tmp_path / "ens.onnx") <= 1e-4
    raw = np.random.default_rng(3).random((5, 1, 32, 32)).astype(np.float32)  # another batch size
    with torch.inference_mode():
        ref = [t.numpy() for t in build_graph(load_model(ens))(torch.from_numpy(raw))]
    got = OnnxBackend(tmp_path / "ens.onnx").run(raw)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ref, got))
    print(f"ensemble with views: ONNX Runtime vs PyTorch max abs diff {diff:.2e}")
    assert diff <= 1e-4
    assert run(model_file, *images, "--out", tmp_path / "pt") == 0
    assert run(onnx_path, *images, "--out", tmp_path / "onnx") == 0
    a, b = read_csv(tmp_path / "pt" / "predictions.csv"), read_csv(tmp_path / "onnx" / "predictions.csv")
    for ra, rb in zip(a, b):
        for col in ("p_malignant", "phi", *ALL_FEATURES):
            if ra[col] != "":
                assert float(ra[col]) == pytest.approx(float(rb[col]), abs=1e-4), col
        assert ra["lesion_area_px"] == rb["lesion_area_px"]


def test_predict_imports_no_flwr_and_onnx_predict_no_torch(model_file, images, tmp_path) -> None:
    code = ("import sys, client.predict; "
            "print(','.join(m for m in ('flwr', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == ""
    pytest.importorskip("onnxruntime")
    assert run("--export", "onnx", model_file, tmp_path / "m.onnx") == 0
    code = ("import sys; from client.predict import main; "
            f"rc = main([{str(tmp_path / 'm.onnx')!r}, {str(images[0])!r}, '--out', "
            f"{str(tmp_path / 'o')!r}, '--no-progress']); "
            "print(rc, 'heavy:' + ','.join(m for m in ('flwr', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip().splitlines()[-1]
    assert out == "0 heavy:"

"""The site check counts the images per kind of annotation (mask and label, label only, mask only,
normal): in ``check_site``'s report, in ``fedbus-site-check``'s output and in the summary that
``flower-client --check`` hands to the site's audit log."""
from __future__ import annotations

from pathlib import Path

from client.check import main as site_check
from client.cli import check_data
from client.site_config import load_site_config
from common.data.check import ANNOTATION_KINDS, annotation_counts, check_site
from common.data.manifest import load as load_manifest
from tests.common.test_data_readers import blob, img, png

#: image, mask, label → expected kind (hand-assigned)
ROWS = (
    ("a", True, "malignant", "mask and label"),
    ("b", True, "benign", "mask and label"),
    ("c", False, "benign", "label only"),
    ("d", False, "malignant", "label only"),
    ("e", False, "malignant", "label only"),
    ("f", True, "", "mask only"),
    ("g", False, "normal", "normal"),
)


def partial_site(root: Path) -> Path:
    """A manifest site with every kind of annotation (counts 2, 3, 1, 1)."""
    lines = ["image,mask,label,patient_id"]
    for i, (name, has_mask, label, _kind) in enumerate(ROWS):
        png(root / "imgs" / f"{name}.png", img(i + 1))
        mask = ""
        if has_mask:
            png(root / "masks" / f"{name}.png", blob())
            mask = f"masks/{name}.png"
        lines.append(f"imgs/{name}.png,{mask},{label},P{i}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


EXPECTED = {"mask and label": 2, "label only": 3, "mask only": 1, "normal": 1}


def test_annotation_counts_by_hand(tmp_path: Path) -> None:
    cases = load_manifest(partial_site(tmp_path / "data")).cases
    by_id = {c.case_id.split("/")[-1]: c for c in cases}
    for name, _m, _l, kind in ROWS:
        assert annotation_counts([by_id[name]]) == {k: int(k == kind) for k in ANNOTATION_KINDS}, name
    assert annotation_counts(cases) == EXPECTED
    assert annotation_counts([]) == dict.fromkeys(ANNOTATION_KINDS, 0)


def test_site_report_counts_and_prints_each_kind(tmp_path: Path) -> None:
    rep = check_site(partial_site(tmp_path / "data"), "manifest")
    assert rep.ok and rep.annotations == EXPECTED
    # the mask-only image's placeholder label is not counted as a class
    assert rep.per_class == {"benign": 2, "malignant": 3, "normal": 1, "unlabelled": 1}
    assert rep.n_cases == len(ROWS)
    assert "annotations: mask and label 2 · label only 3 · mask only 1 · normal 1" in rep.format()


def test_fully_annotated_site_has_no_unlabelled_class(tmp_path: Path) -> None:
    root = tmp_path / "data"
    png(root / "a.png", img(1))
    png(root / "m.png", blob())
    png(root / "b.png", img(2))
    (root / "manifest.csv").write_text("image,mask,label\na.png,m.png,benign\nb.png,,normal\n")
    rep = check_site(root, "manifest")
    assert rep.per_class == {"benign": 1, "malignant": 0, "normal": 1}
    assert rep.annotations == {"mask and label": 1, "label only": 0, "mask only": 0, "normal": 1}


def test_site_check_cli_prints_the_counts(tmp_path: Path, capsys) -> None:
    assert site_check(["--data", str(partial_site(tmp_path / "data"))]) == 0
    out = capsys.readouterr().out
    assert "annotations: mask and label 2 · label only 3 · mask only 1 · normal 1" in out
    assert "result: OK" in out


def test_flower_client_check_returns_the_counts(tmp_path: Path, capsys) -> None:
    partial_site(tmp_path / "data")
    yaml = tmp_path / "site.yaml"
    yaml.write_text("site: h1\ninsecure: true\ndata:\n  path: data\n  format: manifest\n")
    status, summary = check_data(load_site_config(yaml))
    assert status == 0 and summary["annotations"] == EXPECTED
    assert "label only 3" in capsys.readouterr().out

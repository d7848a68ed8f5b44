"""benchmarks/external_validation.py end to end on tiny fixtures in the published layouts: both
arms, every BrEaST image trained (--val-fraction 0 --select last), the near-field splice on, and
the paired p-value of the consistency arm computed by case id."""
import numpy as np
import pandas as pd
import pytest

from benchmarks.external_validation import main


def test_all_images_last_epoch_both_arms(tmp_path, tiny_centres):
    _, options = tiny_centres
    common = options + ["--depth-splice", "0.5"]
    assert main(common + ["--out", str(tmp_path / "refused")]) == 2  # no validation images for --select val
    assert main(common + ["--select", "last", "--out", str(tmp_path / "run")]) == 0
    table = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert set(table.arm) == {"plain", "consistency"} and set(table.centre) == {"BUSI"}
    assert (table.epoch == 1).all()
    assert table[table.arm == "plain"].p_dice_vs_plain.isna().all()
    per_image = pd.read_csv(tmp_path / "run" / "per_image.csv")
    assert len(per_image) == 2 * 5  # BUSI fixture: 5 images, 3 with a lesion
    assert np.isfinite(per_image[per_image.has_lesion].dice).all()
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert "val_dice" not in history.columns and len(history) == 2


def test_every_augmentation_flag_reaches_the_config_and_defaults_match_it():
    from benchmarks.external_validation import AUG_FLAGS, arm_config, parse_args
    from common.config import AugmentConfig
    assert arm_config(parse_args([]), "plain", 16).data.augmentation == AugmentConfig()
    argv = ["--aug-rotate", "5", "--depth-splice", "0.5", "--aug-stretch", "0.25", "--calm-epochs", "3"]
    aug = arm_config(parse_args(argv), "consistency", 16).data.augmentation
    assert (aug.rotate_deg, aug.depth_splice, aug.stretch, aug.calm_epochs) == (5.0, 0.5, 0.25, 3)
    assert {name for _, name, _ in AUG_FLAGS} == set(AugmentConfig.__dataclass_fields__)


def test_low_res_flags_reach_the_train_config():
    from benchmarks.external_validation import arm_config, parse_args
    train = arm_config(parse_args(["--low-res-epochs", "36", "--low-res-scale", "0.75"]), "plain", 16).train
    assert (train.low_res_epochs, train.low_res_scale) == (36, 0.75)
    assert arm_config(parse_args([]), "plain", 16).train.low_res_epochs == 0


def test_mask_head_flag_reaches_the_model_config():
    from benchmarks.external_validation import arm_config, parse_args
    assert arm_config(parse_args(["--mask-head", "half"]), "plain", 16).model.mask_head == "half"
    assert arm_config(parse_args(["--mask-head", "slim"]), "plain", 16).model.mask_head == "slim"
    assert arm_config(parse_args([]), "plain", 16).model.mask_head == "full"


def test_depth_tta_shifts_are_parsed_and_checked():
    from benchmarks.external_validation import parse_args
    assert parse_args(["--depth-tta", "0.15,0.3"]).depth_tta == (0.15, 0.3)
    assert parse_args([]).depth_tta == ()
    for bad in ("0.3,x", "0.3,1.2"):
        with pytest.raises(SystemExit):
            parse_args(["--depth-tta", bad])


def test_raw_rows_scored_from_the_tta_pass_equal_a_separate_raw_pass():
    import torch

    from benchmarks.external_validation import score
    from common.config import LossConfig, ModelConfig
    from common.data.synthetic import make_centre
    from common.data.tensors import to_tensors
    from common.model import build_model

    torch.manual_seed(0)
    data = to_tensors(make_centre("SynEG", 6, size=32, seed=0), 32)
    model = build_model(ModelConfig(base_channels=4, depth=2), LossConfig().features).eval()
    alone, alone_images = score(model, {"BUSI": data}, False, "cpu", 0, arm="a")
    both, both_images = score(model, {"BUSI": data}, False, "cpu", 0, arm="a", depth_tta=(0.25,))
    assert [r["inference"] for r in both] == ["raw", "flip+shift"]
    assert both[0] == alone[0]
    pd.testing.assert_frame_equal(both_images[0], alone_images[0])
    assert not both_images[1]["p_malignant"].equals(both_images[0]["p_malignant"])  # the TTA is not the raw

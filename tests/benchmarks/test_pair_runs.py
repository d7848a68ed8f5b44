import numpy as np
import pandas as pd
import pytest

from benchmarks.pair_runs import main, pair


def write(run, arm, dice, inference="raw", has_lesion=None):
    run.mkdir()
    n = len(dice)
    pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "eval_centre": "BUSI", "inference": inference,
                  "arm": arm, "has_lesion": has_lesion or [1] * n, "dice": dice}).to_csv(
        run / "per_image.csv", index=False)


def test_pairs_images_and_reports_the_shift(tmp_path, capsys):
    write(tmp_path / "a", "plain", [0.1 * i for i in range(8)] + [0.9])
    write(tmp_path / "b", "consistency", [0.1 * i + 0.05 for i in range(8)] + [0.2], has_lesion=[1] * 8 + [0])
    with pytest.raises(ValueError, match="different images"):  # b's 9th image is not a lesion image
        pair(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "per_image.csv").unlink()
    (tmp_path / "b").rmdir()
    write(tmp_path / "b", "consistency", [0.1 * i + 0.05 for i in range(8)] + [0.95])
    row = pair(tmp_path / "a", tmp_path / "b").iloc[0]
    assert row.n_lesion == 9 and row.b_minus_a == pytest.approx(0.05)
    assert row.p_wilcoxon < 0.01  # every image is better in b
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0 and "BUSI" in capsys.readouterr().out


def test_missing_run_and_mixed_arms_are_named(tmp_path):
    assert main([str(tmp_path / "nope"), str(tmp_path / "nope")]) == 2
    write(tmp_path / "a", "plain", [0.5] * 6)
    pi = pd.read_csv(tmp_path / "a" / "per_image.csv")
    pd.concat([pi, pi.assign(arm="consistency")]).to_csv(tmp_path / "a" / "per_image.csv", index=False)
    with pytest.raises(ValueError, match="pair runs of one arm each"):
        pair(tmp_path / "a", tmp_path / "a")


def test_pairing_is_by_case_id_not_row_order():
    """The benchmark's own p-value goes through pair_frames: shuffling one frame changes nothing."""
    from benchmarks.pair_runs import pair_frames

    rng = np.random.default_rng(0)
    a = pd.DataFrame({"case_id": [f"c{i}" for i in range(30)], "eval_centre": "BUSI", "inference": "raw",
                      "has_lesion": True, "dice": rng.uniform(0, 1, 30)})
    b = a.assign(dice=a.dice + rng.uniform(0.0, 0.1, 30))  # every image a little better
    same = pair_frames(a, b).iloc[0]
    shuffled = pair_frames(a, b.sample(frac=1, random_state=1)).iloc[0]
    assert same.p_wilcoxon < 1e-4 and shuffled.p_wilcoxon == same.p_wilcoxon
    with pytest.raises(ValueError, match="scored twice"):
        pair_frames(a, pd.concat([b, b.iloc[:1]]))


def test_two_inference_variants_of_one_run(tmp_path, capsys):
    write(tmp_path / "a", "consistency", [0.1 * i for i in range(8)])
    pi = pd.read_csv(tmp_path / "a" / "per_image.csv")
    pd.concat([pi, pi.assign(inference="flip+shift", dice=pi.dice + 0.02)]).to_csv(
        tmp_path / "a" / "per_image.csv", index=False)
    row = pair(tmp_path / "a", tmp_path / "a", ("raw", "flip+shift")).iloc[0]
    assert row.inference == "raw vs flip+shift" and row.b_minus_a == pytest.approx(0.02)
    with pytest.raises(ValueError, match="no rows with inference 'flip\\+lcc'"):
        pair(tmp_path / "a", tmp_path / "a", ("raw", "flip+lcc"))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a"), str(tmp_path / "a"), "--inference-a", "raw"])
    assert main([str(tmp_path / "a"), str(tmp_path / "a"), "--inference-a", "raw",
                 "--inference-b", "flip+shift"]) == 0
    assert "raw vs flip+shift" in capsys.readouterr().out

"""benchmarks/pair_runs.py on hand-made per_image.csv files in the simulation's layout."""
import numpy as np
import pandas as pd
import pytest

from benchmarks.pair_runs import arm_dice, main, pair, pair_frames


def frame(arm, dice, seed=0, has_lesion=None, centre="BUSI", protocol="paper"):
    n = len(dice)
    return pd.DataFrame({"protocol": protocol, "arm": arm, "train_set": "BrEaST", "seed": seed,
                         "case_id": [f"c{i}" for i in range(n)], "test_centre": centre,
                         "has_lesion": has_lesion or [1] * n, "dice": dice})


def write(run, *frames):
    run.mkdir(exist_ok=True)
    pd.concat(frames, ignore_index=True).to_csv(run / "per_image.csv", index=False)


def test_pairs_images_and_reports_the_shift(tmp_path, capsys):
    write(tmp_path / "a", frame("consistency", [0.1 * i for i in range(8)] + [0.9]))
    write(tmp_path / "b", frame("consistency", [0.1 * i + 0.05 for i in range(8)] + [0.2],
                                has_lesion=[1] * 8 + [0]))
    with pytest.raises(ValueError, match="different images"):  # b's 9th image is not a lesion image
        pair(tmp_path / "a", tmp_path / "b")
    write(tmp_path / "b", frame("consistency", [0.1 * i + 0.05 for i in range(8)] + [0.95]))
    row = pair(tmp_path / "a", tmp_path / "b").iloc[0]
    assert row.n_lesion == 9 and row.b_minus_a == pytest.approx(0.05)
    assert row.p_wilcoxon < 0.01  # every image is better in b
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0 and "BUSI" in capsys.readouterr().out


def test_seeds_are_averaged_per_image_and_the_ensemble_is_an_arm_of_its_own(tmp_path):
    run = tmp_path / "r"
    write(run, frame("consistency", [0.2, 0.4, 0.6], seed=8), frame("consistency", [0.4, 0.6, 0.8], seed=9),
          frame("consistency-ens", [0.5, 0.7, 0.9], seed=-1))
    got = arm_dice(pd.read_csv(run / "per_image.csv"), "paper", "consistency", "r")
    np.testing.assert_allclose(got.to_numpy(), [0.3, 0.5, 0.7])
    row = pair(run, run, "consistency", "consistency-ens").iloc[0]
    assert row.n_lesion == 3 and row.b_minus_a == pytest.approx(0.2)
    with pytest.raises(ValueError, match="holds arms"):  # two arms: the caller must choose
        pair(run, run)


def test_missing_run_and_unknown_arm_are_named(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "nope")]) == 2
    write(tmp_path / "a", frame("consistency", [0.5] * 6))
    assert main([str(tmp_path / "a"), str(tmp_path / "a"), "--arm-b", "multitask"]) == 2
    assert "no lesion rows of protocol 'paper', arm 'multitask'" in capsys.readouterr().err


def test_pairing_is_by_case_id_not_row_order():
    rng = np.random.default_rng(0)
    a = frame("x", list(rng.uniform(0, 1, 30)))
    b = a.assign(dice=a.dice + rng.uniform(0.0, 0.1, 30))  # every image a little better
    sa, sb = arm_dice(a, "paper", None, "a"), arm_dice(b, "paper", None, "b")
    same = pair_frames(sa, sb).iloc[0]
    shuffled = pair_frames(sa, arm_dice(b.sample(frac=1, random_state=1), "paper", None, "b")).iloc[0]
    assert same.p_wilcoxon < 1e-4 and shuffled.p_wilcoxon == same.p_wilcoxon
    with pytest.raises(ValueError, match="share no"):
        pair_frames(sa, arm_dice(frame("x", [0.5] * 3, centre="UDIAT"), "paper", None, "c"))

"""gpu_sweep.py's bookkeeping, on run folders written here: the row it reads from a run's files,
the blow-up measure, the table, and its flags. (The runs themselves need a GPU: gpu_check.sh.)"""

import json

import pytest

import gpu_sweep


def test_largest_rise_is_over_the_best_so_far():
    assert gpu_sweep.largest_rise([7.0, 6.0, 6.4, 5.0, 5.2]) == pytest.approx(0.4)
    assert gpu_sweep.largest_rise([7.0, 6.0, 5.0]) == 0.0
    assert gpu_sweep.largest_rise([6.0, 15e6, 6.1]) == pytest.approx(15e6 - 6.0)


def test_summarise_reads_the_run_files(tmp_path):
    records = [dict(epoch=1, train_bpd=5.0, val_bpd=4.5, val_acc=0.5, images_per_s=100.0,
                    train_seconds=10.0, skipped_steps=0, rollbacks=0),
               dict(epoch=2, train_bpd=5.3, val_bpd=4.2, val_acc=0.6, images_per_s=300.0,
                    train_seconds=30.0, skipped_steps=2, rollbacks=1)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "class_prior.json").write_text(json.dumps(dict(val_acc=0.65)))
    row = gpu_sweep.summarise("mid", tmp_path, 0, 100.0)
    assert row["acc_uniform"] == 0.6 and row["acc_fitted"] == 0.65 and row["val_bpd"] == 4.2
    assert row["images_per_s"] == pytest.approx((1000 + 9000) / 40)    # images over seconds
    assert (row["epochs"], row["skipped"], row["rollbacks"]) == (2, 2, 1)
    assert row["rise"] == pytest.approx(0.3)
    assert row["flags"] == " ".join(gpu_sweep.CANDIDATES["mid"])
    lines = gpu_sweep.table([row, gpu_sweep.summarise("preset", tmp_path / "none", "timeout", 1)])
    assert "| mid |" in lines and "65.00%" in lines and "60.00%" in lines
    assert "| preset | `(the preset)` | - | - |" in lines and "timeout" in lines


def test_every_candidate_is_a_valid_training_command(tmp_path):
    """Each candidate's flags parse as pcnn_train.py's (on top of --preset gpu)."""
    import pcnn_train
    for name in gpu_sweep.CANDIDATES:
        args = pcnn_train.parse_args(gpu_sweep.train_command(
            name, gpu_sweep.parse_args(["--minutes", "1"]), tmp_path, tmp_path)[2:])
        assert args.preset == "gpu" and args.max_minutes == 1


@pytest.mark.parametrize("minutes", ["0", "-1", "61"])
def test_minutes_out_of_range_is_an_error(minutes, capsys):
    with pytest.raises(SystemExit):
        gpu_sweep.parse_args(["--minutes", minutes])
    assert "--minutes" in capsys.readouterr().err

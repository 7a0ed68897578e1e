import pytest

from linearize import checkpoint


def write_ckpt(root, step, fail=False):
    def write(tmp):
        (tmp / "weights").write_text(str(step))
        if fail:
            raise OSError("No space left on device")

    checkpoint.write_atomic(checkpoint.step_dir(root, step), write, info={"step": step})


def test_incomplete_folder_is_ignored_and_failed_save_keeps_older(tmp_path):
    write_ckpt(tmp_path, 10)
    with pytest.raises(
        checkpoint.SaveError, match=r"could not write .*step-00000020: No space left on device"
    ):
        write_ckpt(tmp_path, 20, fail=True)
    assert checkpoint.latest(tmp_path)[0] == 10
    (tmp_path / "step-00000030").mkdir()  # a folder without the marker, as left by a kill
    assert checkpoint.latest(tmp_path)[0] == 10


def test_prune_keeps_newest_and_removes_temp(tmp_path):
    for step in (10, 20, 30):
        write_ckpt(tmp_path, step)
    (tmp_path / ".tmp-step-00000040").mkdir()
    checkpoint.prune(tmp_path, keep=2)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [20, 30]
    assert not list(tmp_path.glob(".tmp-*"))

"""Crash-safe training: a real `kill -9` of `sparsec train`, then --resume, bit for bit."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from sparsec.outputs import MARKER
from sparsec.cli import cli
from sparsec.training import train_model

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
STALL = HERE / "stall_model.py"
# the checkpoint of step 4 falls inside the warm-up of the entries grown at step 3
PASS = "sparse-finetune:method=delta,density=0.05,regrow_every=3,regrow_warmup=4"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {f"d/{k}": v for k, v in load_file(directory / "deltas.safetensors").items()}
    out.update({f"o/{k}": v for k, v in load_file(directory / "optimizer.safetensors").items()})
    return out


def _kill_at_stall(out: Path, flag: Path, stall_at: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPARSEC_TEST_STALL_AT": str(stall_at),
           "SPARSEC_TEST_STALL_FLAG": str(flag), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sparsec", "train", str(STALL), "--pass",
                             PASS, "--steps", "8", "--save-every", "2", "--no-verify", "-o",
                             str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before the stall: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("the run did not reach the stall in 300 s")
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return proc.pid


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical_to_one_run(tmp_path):
    ck, flag = tmp_path / "ck", tmp_path / "stalled"
    # item 5 feeds step 6: steps 1-5 ran, the checkpoint of step 4 is the last complete one
    pid = _kill_at_stall(ck, flag, stall_at=5)
    assert (ck / MARKER).is_file() and (ck / "recipe.toml").is_file()
    from sparsec.training.deltas import load_deltas

    assert load_deltas(ck / "deltas.safetensors").info == {"step": 4}
    # what a kill during a checkpoint write leaves: a staging directory of the dead process
    stale = tmp_path / f".ck.sparsec-{pid}-0123abcd"
    stale.mkdir()
    (stale / MARKER).write_text("x")
    (stale / "deltas.safetensors").write_bytes(b"half")
    live = tmp_path / f".ck.sparsec-{os.getpid()}-4567cdef"  # a live process's: kept
    live.mkdir()
    (live / MARKER).write_text("x")

    r = CliRunner().invoke(cli, ["train", str(STALL), "--resume", str(ck), "--steps", "4",
                                 "--no-verify", "-o", str(ck), "--force"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert not stale.exists() and live.exists()
    live.joinpath(MARKER).unlink()
    live.rmdir()

    full = tmp_path / "full"
    train_model(STALL, steps=8, passes=(PASS,), out_dir=full, save_every=2, verify=False)
    got, want = _tensors(ck), _tensors(full)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert load_deltas(ck / "deltas.safetensors").info == {"step": 8}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

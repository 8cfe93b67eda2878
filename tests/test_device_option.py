"""--device: the model, its example inputs and every batch go to one device."""

import subprocess
import sys

import pytest
import torch

import sparsec
from sparsec.errors import BadInputError
from sparsec.sources import SourceOptions, on_device, parse_device
from sparsec.testing.hf_dirs import chat_rows, make_dir, write_jsonl


def test_batches_are_moved_with_their_structure():
    batches = lambda: iter([(torch.ones(2), {"m": torch.zeros(1)}, 3)])  # noqa: E731
    (a, d, n), = list(on_device(batches, torch.device("meta"))())
    assert a.device.type == "meta" and d["m"].device.type == "meta" and n == 3
    assert on_device(None, torch.device("cpu")) is None


@pytest.mark.parametrize("name,message", [
    ("gpu", "not a device name"), ("cuda:7", "CUDA device"), ("meta", "cpu or cuda")])
def test_bad_devices_are_refused(name, message):
    if name == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(BadInputError, match=message):
        parse_device(name)


def test_cli_refuses_a_missing_device_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    r = subprocess.run([sys.executable, "-m", "sparsec", "compile", "examples/tiny_llama.py",
                        "--device", "cuda", "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--device cuda" in r.stderr
    assert not (tmp_path / "o").exists()


def _train_hf(tmp_path, device):
    path = make_dir(tmp_path / "tiny-llama")
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows())
    run = sparsec.train_model(path, steps=2, passes=["sparse-finetune:density=0.05"],
                              source=SourceOptions(data=data, seq_len=8, batch_size=2,
                                                   device=device))
    return run


def test_hf_directory_trains_on_the_named_device(tmp_path):
    run = _train_hf(tmp_path, "cpu")
    assert run.compiled.program.example_inputs[0].device.type == "cpu"
    assert all(torch.isfinite(torch.tensor(run.trainer.stats.losses)))


@pytest.mark.gpu
def test_hf_directory_trains_on_cuda(tmp_path):
    """A user's HF checkpoint and JSONL file on the GPU: inputs, batches and weights on CUDA."""
    run = _train_hf(tmp_path, "cuda")
    program = run.compiled.program
    assert program.example_inputs[0].is_cuda
    assert all(p.is_cuda for p in program.gm.parameters())
    losses = run.trainer.stats.losses
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

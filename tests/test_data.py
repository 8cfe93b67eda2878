"""Data files into batches: formats, packing, prompt masking, shuffling, memory-mapped shards."""

import json
import resource

import numpy as np
import pytest
import torch

from sparsec.data import IGNORE, DataOptions, make_batches
from sparsec.errors import BadInputError
from sparsec.testing.hf_dirs import tokenizer


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _all(batches):
    return list(batches())


def test_text_is_packed_to_seq_len(tmp_path, tok):
    p = tmp_path / "t.txt"
    p.write_text("hello world this is a test\n\nthe compiler proves each rewrite\n" * 3)
    out = _all(make_batches(p, DataOptions(seq_len=5, batch_size=2, shuffle=False), tok))
    ids = torch.cat([b[0] for b in out]).reshape(-1)
    eos = tok.eos_token_id
    stream = (tok("hello world this is a test")["input_ids"] + [eos]
              + tok("the compiler proves each rewrite")["input_ids"] + [eos]) * 3
    assert out[0][0].shape == (2, 5)
    assert ids.tolist() == stream[:len(ids)]  # packed in order, documents end with EOS
    assert all(torch.equal(x, y) for x, y in out)  # plain text: loss on every token


def test_jsonl_prompt_takes_no_loss(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "hello world", "completion": "this is a test"}) + "\n")
    ids, labels = _all(make_batches(p, DataOptions(seq_len=7, batch_size=1), tok))[0]
    n_prompt = len(tok("hello world")["input_ids"])
    assert (labels[0, :n_prompt] == IGNORE).all()
    assert torch.equal(labels[0, n_prompt:], ids[0, n_prompt:])


def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path):
    p = tmp_path / "s.npy"
    np.save(p, np.arange(4000, dtype=np.int32))
    first = [b[0] for b in make_batches(p, DataOptions(seq_len=10, batch_size=4, seed=7))()]
    again = make_batches(p, DataOptions(seq_len=10, batch_size=4, seed=7))
    assert all(torch.equal(a, b[0]) for a, b in zip(first, again()))
    second_epoch = list(again())
    assert not all(torch.equal(a, b[0]) for a, b in zip(first, second_epoch))
    rows = torch.cat(first)
    assert sorted(rows[:, 0].tolist()) == list(range(0, 4000, 10))  # every sequence once


def test_safetensors_shard_with_labels(tmp_path):
    from safetensors.numpy import save_file

    ids = np.arange(60, dtype=np.int64).reshape(6, 10)
    labels = np.where(ids % 2 == 0, ids, IGNORE)
    save_file({"input_ids": ids, "labels": labels}, str(tmp_path / "s.safetensors"))
    out = _all(make_batches(tmp_path / "s.safetensors",
                            DataOptions(seq_len=15, batch_size=2, shuffle=False)))
    assert out[0][0][0].tolist() == list(range(15)) and len(out) == 2
    assert out[0][1][0].tolist() == [i if i % 2 == 0 else IGNORE for i in range(15)]


def test_a_large_shard_is_memory_mapped(tmp_path):
    p = tmp_path / "big.npy"
    n = 48 * 2**20  # 192 MiB of int32 tokens, written in pieces (never all in memory)
    chunk = np.ones(2**22, dtype=np.int32).tobytes()
    with open(p, "wb") as f:
        header = {"descr": "<i4", "fortran_order": False, "shape": (n,)}
        np.lib.format.write_array_header_1_0(f, header)
        for _ in range(n // 2**22):
            f.write(chunk)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    batches = make_batches(p, DataOptions(seq_len=256, batch_size=4, seed=0))
    for i, _ in zip(range(5), batches()):
        pass
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64, f"reading 5 batches grew the peak RSS by {grown_mib:.0f} MiB"


def test_jsonl_is_streamed(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    good = json.dumps({"text": "hello world this is a test"}) + "\n"
    p.write_text(good * 20 + "not json\n")
    batches = make_batches(p, DataOptions(seq_len=4, batch_size=2, shuffle=False), tok)
    assert next(batches())[0].shape == (2, 4)  # the bad line is not read yet
    with pytest.raises(BadInputError, match=r"d.jsonl:21: not JSON"):
        _all(batches)


@pytest.mark.parametrize("content,match", [
    ('{"txt": "x"}\n', "no 'text' field"),
    ("[1, 2]\n", "not an object"),
    ('{"text": "hello"}\n', "too little data"),
])
def test_bad_data_is_one_line(tmp_path, tok, content, match):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(BadInputError, match=match):
        make_batches(p, DataOptions(seq_len=64, batch_size=2), tok)


def test_text_without_tokenizer_and_pickled_npy_are_refused(tmp_path):
    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(BadInputError, match="needs a tokenizer"):
        make_batches(tmp_path / "t.txt", DataOptions())
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadInputError, match="not a readable .npy"):
        make_batches(tmp_path / "o.npy", DataOptions(seq_len=1, batch_size=1))

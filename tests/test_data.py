"""Token windows: exact non-overlapping cuts of the tokenized stream, from every supported file type."""

import json
import os

import numpy as np
import pytest
from conftest import CORPUS, make_cfg

from outlier_hydra.data import token_windows
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(make_cfg().model)


def _stream(tokenizer, docs):
    ids = []
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    return ids


def test_windows_are_consecutive_cuts_and_skip_shards(tokenizer, tmp_path):
    docs = [f"document number {i} says something about hackers and jargon." for i in range(200)]
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stream = _stream(tokenizer, docs)
    cfg = make_cfg("dataset=local", f"dataset.data_files={f}", "dataset.num_sequences=5", "dataset.sequence_length=16")
    w = token_windows(cfg.dataset, tokenizer)
    assert w.shape == (5, 16) and w.dtype == np.int64
    assert w.ravel().tolist() == stream[:80]
    cfg.dataset.skip_sequences = 3
    assert token_windows(cfg.dataset, tokenizer).ravel().tolist() == stream[48:128]


@pytest.mark.parametrize("kind", ["parquet", "txt-glob"])
def test_other_file_types(kind, tokenizer, tmp_path):
    docs = [f"paragraph {i} of the local corpus." for i in range(50)]
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet")
        overrides = [f"dataset.data_files={tmp_path}/*.parquet", "dataset.text_field=body"]
    else:
        (tmp_path / "a.txt").write_text("\n\n".join(docs[:25]))
        (tmp_path / "b.txt").write_text("\n\n".join(docs[25:]))
        overrides = [f"dataset.data_files={tmp_path}/*.txt"]
    cfg = make_cfg("dataset=local", *overrides, "dataset.num_sequences=4", "dataset.sequence_length=20")
    assert token_windows(cfg.dataset, tokenizer).ravel().tolist() == _stream(tokenizer, docs)[:80]


def test_shuffle_is_seeded(tokenizer):
    base = ["dataset.num_sequences=4", "dataset.sequence_length=32", "dataset.shuffle=true"]
    a = token_windows(make_cfg(*base, "dataset.seed=1").dataset, tokenizer)
    b = token_windows(make_cfg(*base, "dataset.seed=1").dataset, tokenizer)
    c = token_windows(make_cfg(*base, "dataset.seed=2").dataset, tokenizer)
    plain = token_windows(make_cfg(*base[:2]).dataset, tokenizer)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, plain)


def test_mixed_file_types_are_refused(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    cfg = make_cfg("dataset=local", f"dataset.data_files={tmp_path}/*")
    with pytest.raises(OutlierHydraError, match=r"dataset\.data_files: .* mixes file types"):
        token_windows(cfg.dataset, tokenizer)


def test_shipped_corpus_is_real_text():
    text = open(CORPUS).read()
    assert len(text) > 50_000 and "hacker" in text


def test_hub_code_path_with_a_local_dataset_directory(tokenizer, tmp_path):
    """dataset=hub runs load_dataset(name, config_name, split=..., streaming=True), the call used for
    HuggingFaceFW/fineweb-edu; a local dataset directory drives the same call offline."""
    docs = [f"hub-style document {i} about systematic outliers." for i in range(60)]
    data = tmp_path / "my_dataset" / "data"
    data.mkdir(parents=True)
    (data / "train-00000.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    hub = make_cfg(
        "dataset=hub",
        f"dataset.name={tmp_path / 'my_dataset'}",
        "dataset.config_name=null",
        "dataset.num_sequences=3",
        "dataset.sequence_length=24",
    )
    local = make_cfg(
        "dataset=local", f"dataset.data_files={data}/*.jsonl", "dataset.num_sequences=3", "dataset.sequence_length=24"
    )
    got = token_windows(hub.dataset, tokenizer)
    assert got.ravel().tolist() == _stream(tokenizer, docs)[:72]
    assert np.array_equal(got, token_windows(local.dataset, tokenizer))


GPL3 = "/usr/share/common-licenses/GPL-3"


def test_a_text_file_without_a_suffix_reads_as_text(tokenizer, tmp_path):
    """Debian's GPL-3 licence (a file named just GPL-3) and a `corpus.dat`: text by content."""
    source = GPL3 if os.path.exists(GPL3) else None
    text = open(source).read() if source else "\n\n".join(f"paragraph {i} of a licence." for i in range(400))
    dat = tmp_path / "corpus.dat"
    dat.write_text(text)
    reference = tmp_path / "corpus.txt"
    reference.write_text(text)
    for path in filter(None, (source, str(dat))):
        cfg = make_cfg(
            "dataset=local", f"dataset.data_files={path}", "dataset.num_sequences=4", "dataset.sequence_length=64"
        )
        got = token_windows(cfg.dataset, tokenizer)
        ref = make_cfg(
            "dataset=local", f"dataset.data_files={reference}", "dataset.num_sequences=4", "dataset.sequence_length=64"
        )
        assert np.array_equal(got, token_windows(ref.dataset, tokenizer)), path


def test_dataset_format_names_the_format_of_files_without_a_suffix(tokenizer, tmp_path):
    docs = [f"record {i} of a json-lines file without its suffix." for i in range(80)]
    (tmp_path / "records.data").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = make_cfg(
        "dataset=local",
        f"dataset.data_files={tmp_path}/records.data",
        "dataset.format=jsonl",
        "dataset.num_sequences=3",
        "dataset.sequence_length=20",
    )
    assert token_windows(cfg.dataset, tokenizer).ravel().tolist() == _stream(tokenizer, docs)[:60]


@pytest.mark.parametrize("content", [bytes(range(256)) * 50, "caf\u00e9".encode("latin-1") * 100])
def test_binary_or_undecodable_files_are_refused_naming_the_file_and_the_key(content, tokenizer, tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(content)
    cfg = make_cfg("dataset=local", f"dataset.data_files={f}")
    with pytest.raises(
        OutlierHydraError,
        match=rf"^dataset\.data_files: {f}: not UTF-8 text; if it is another format, "
        r"say which with dataset\.format \(text, jsonl, json, csv, parquet\)$",
    ):
        token_windows(cfg.dataset, tokenizer)

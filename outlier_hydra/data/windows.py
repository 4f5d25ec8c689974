"""Text stream (hub or local files, through `datasets`) -> token windows [num_sequences, sequence_length].

Documents are tokenized without special tokens and joined into one stream, each followed by the
tokenizer's end-of-sequence (or separator) token when it has one. The stream is cut into
non-overlapping windows of exactly ``sequence_length`` tokens; the first ``skip_sequences`` windows
are skipped (hand-made sharding) and the next ``num_sequences`` are kept. Nothing past that is read,
so a streamed hub dataset costs only the text it needs.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from outlier_hydra.config.schema import enum_value
from outlier_hydra.errors import OutlierHydraError, first_line

BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# dataset.format -> the `datasets` builder; auto: by suffix, else by content (valid UTF-8 text is text)
FORMATS = {"text": "text", "jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}
SNIFF_BYTES = 1 << 16
TOKENIZE_BATCH = 64


def is_text(path: str) -> bool:
    """No NUL byte and valid UTF-8 in the first 64 KiB (a character cut at the sample's end counts)."""
    with open(path, "rb") as f:
        data = f.read(SNIFF_BYTES)
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return len(data) == SNIFF_BYTES and exc.start >= len(data) - 3
    return True


def builder_for(path: str, fmt: str) -> str:
    """The `datasets` builder that reads this file under dataset.format, or a one-line error."""
    builder = FORMATS.get(fmt) if fmt != "auto" else BUILDERS.get(Path(path).suffix.lower(), "text")
    if builder == "text" and not is_text(path):
        raise OutlierHydraError(
            f"dataset.data_files: {path}: not UTF-8 text; if it is another format, say which with dataset.format "
            f"({', '.join(FORMATS)})"
        )
    assert builder is not None
    return builder


def resolve_data_files(pattern: str | None, fmt: str = "auto") -> tuple[str, list[str]]:
    """(datasets builder, sorted file list) for dataset.data_files, or a one-line error."""
    if not pattern:
        raise OutlierHydraError("dataset.data_files: not set (a path or glob of text/.jsonl/.parquet files)")
    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise OutlierHydraError(f"dataset.data_files: no file matches {pattern}")
    kinds = {builder_for(f, fmt) for f in files}
    if len(kinds) > 1:
        raise OutlierHydraError(f"dataset.data_files: {pattern} mixes file types {sorted(kinds)} (dataset.format=auto)")
    return kinds.pop(), files


def open_dataset(ds_cfg):
    """The `datasets` object for the config (streaming unless dataset.streaming=false)."""
    from datasets import load_dataset

    source = enum_value(ds_cfg.source)
    try:
        if source == "local":
            builder, files = resolve_data_files(ds_cfg.data_files, ds_cfg.format)
            extra = {"sample_by": "paragraph"} if builder == "text" else {}
            ds = load_dataset(builder, data_files=files, split="train", streaming=ds_cfg.streaming, **extra)
            where = ds_cfg.data_files
        else:
            if not ds_cfg.name:
                raise OutlierHydraError("dataset.name: not set (a hub dataset id, e.g. HuggingFaceFW/fineweb-edu)")
            ds = load_dataset(ds_cfg.name, ds_cfg.config_name, split=ds_cfg.split, streaming=ds_cfg.streaming)
            where = ds_cfg.name
    except OutlierHydraError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the key and the reason
        key = "dataset.data_files" if source == "local" else "dataset.name"
        what = ds_cfg.data_files if source == "local" else ds_cfg.name
        raise OutlierHydraError(f"{key}: cannot open {what}: {first_line(exc)}") from exc
    if ds_cfg.shuffle:
        ds = (
            ds.shuffle(seed=ds_cfg.seed, buffer_size=ds_cfg.shuffle_buffer)
            if ds_cfg.streaming
            else ds.shuffle(seed=ds_cfg.seed)
        )
    return ds, where


def iter_texts(ds, text_field: str, where: str) -> Iterator[str]:
    for record in ds:
        if text_field not in record:
            raise OutlierHydraError(
                f"dataset.text_field: {where} has no field {text_field!r} (fields: {', '.join(map(str, record))})"
            )
        text = record[text_field]
        if isinstance(text, str) and text.strip():
            yield text


def _separator(tokenizer) -> list[int]:
    for attr in ("eos_token_id", "sep_token_id"):
        tok = getattr(tokenizer, attr, None)
        if isinstance(tok, int):
            return [tok]
    return []


def sequence_range(ds_cfg) -> tuple[int, int]:
    """(first window, number of windows) this job analyses: its shard of
    [skip_sequences, skip_sequences + num_sequences), split into num_shards contiguous parts."""
    n, k, shards = ds_cfg.num_sequences, ds_cfg.shard_index, ds_cfg.num_shards
    start, stop = k * n // shards, (k + 1) * n // shards
    return ds_cfg.skip_sequences + start, stop - start


def token_windows(ds_cfg, tokenizer) -> np.ndarray:
    """int64 array [windows of this shard, sequence_length] of token ids, or a one-line error."""
    length = ds_cfg.sequence_length
    skip, wanted = sequence_range(ds_cfg)
    needed = (skip + wanted) * length
    ds, where = open_dataset(ds_cfg)
    sep = _separator(tokenizer)
    stream: list[int] = []
    pending: list[str] = []

    def flush() -> None:
        ids = tokenizer(pending, add_special_tokens=False, verbose=False)["input_ids"]
        for doc in ids:
            stream.extend(doc)
            stream.extend(sep)
        pending.clear()

    for text in iter_texts(ds, ds_cfg.text_field, where):
        pending.append(text)
        if len(pending) >= TOKENIZE_BATCH:
            flush()
            if len(stream) >= needed:
                break
    if pending:
        flush()
    if len(stream) < needed:
        raise OutlierHydraError(
            f"dataset: {where} gave {len(stream)} tokens, but (skip_sequences + num_sequences) x sequence_length = "
            f"({skip} + {wanted}) x {length} = {needed} are needed"
        )
    return np.asarray(stream[skip * length : needed], dtype=np.int64).reshape(wanted, length)

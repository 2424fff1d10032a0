"""Token shards for pretraining: text tokenized once into flat numpy files, read back as a memmap.

`OUT/tokens/train.bin` and `val.bin` hold every document's tokens followed by EOS, as uint16 (or uint32 for
vocabularies over 65,535). meta.json records the sources with their sha256 and the tokenizer's hash, so a
rerun with the same inputs reuses the shards and a changed input rebuilds them.

Batches are packed windows of seq_len + 1 tokens cut from the stream (inputs and shifted targets). The
order is a pure function of (seed, sample index): window `perm_e[i % n]` of epoch e = i // n, with
`perm_e` a seeded permutation. Step s of a run reads samples s*G .. s*G+G-1 (G the global batch), so a
resumed run continues with exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from chatloop.errors import UserError
from chatloop.io import atomic_write_json, check_input_file, disk_full, iter_texts, no_room, sha256_file
from chatloop.tokenizer import Tokenizer

CHUNK_CHARS = 1 << 16  # long documents are encoded in newline-aligned chunks, in parallel


def _chunks(text: str) -> list[str]:
    if len(text) <= CHUNK_CHARS:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS)
        end = len(text) if end == -1 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def tokenize_files(tokenizer: Tokenizer, paths: list[str], text_field: str) -> np.ndarray:
    """All documents of `paths`, each followed by EOS, as one flat array."""
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    parts: list[np.ndarray] = []
    for path in paths:
        for text in iter_texts(path, text_field):
            ids = [i for chunk in tokenizer.encode_batch(_chunks(text)) for i in chunk]
            parts.append(np.asarray(ids + [tokenizer.eos_id], dtype=dtype))
    if not parts:
        raise UserError(f"{', '.join(paths)}: no documents found")
    return np.concatenate(parts)


def _write_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        array.tofile(tmp)
        tmp.replace(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if no_room(e):
            raise disk_full(path, array.nbytes, e) from None
        raise


def build_shards(
    tokenizer: Tokenizer,
    inputs: list[str],
    val_inputs: list[str],
    val_fraction: float,
    text_field: str,
    out_dir: Path,
    tokenizer_path: Path,
) -> dict:
    """Tokenize once into out_dir/{train,val}.bin; reuse them when sources and tokenizer are unchanged."""
    if not inputs:
        raise UserError("--inputs: give at least one text file (.txt, .jsonl, .gz)")
    for path in inputs + val_inputs:
        check_input_file(path)
    sources = {"inputs": [{"path": p, "sha256": sha256_file(p)} for p in inputs],
               "val_inputs": [{"path": p, "sha256": sha256_file(p)} for p in val_inputs],
               "val_fraction": val_fraction, "text_field": text_field,
               "tokenizer_sha256": sha256_file(tokenizer_path)}
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("sources") == sources and (out_dir / "train.bin").is_file():
            return meta
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    train = tokenize_files(tokenizer, inputs, text_field)
    if val_inputs:
        val = tokenize_files(tokenizer, val_inputs, text_field)
    else:
        if not 0 < val_fraction < 1:
            raise UserError("--val_fraction: expected a number between 0 and 1 when no --val_inputs are given")
        cut = int(len(train) * (1 - val_fraction))
        train, val = train[:cut], train[cut:]
    _write_array(out_dir / "train.bin", train)
    _write_array(out_dir / "val.bin", val)
    counts = np.bincount(train, minlength=tokenizer.vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    meta = {"sources": sources, "dtype": str(train.dtype), "train_tokens": int(len(train)),
            "val_tokens": int(len(val)), "unigram_entropy_nats": float(-(p * np.log(p)).sum()),
            "seconds": round(time.perf_counter() - start, 2)}
    atomic_write_json(meta_path, meta)  # written last: shards without meta.json are rebuilt
    return meta


class TokenWindows:
    """Packed (seq_len + 1)-token windows of a shard, in a seeded order indexed by sample number."""

    def __init__(self, path: Path, dtype: str, seq_len: int, seed: int) -> None:
        self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.seq_len = seq_len
        self.seed = seed
        self.n_windows = (len(self.tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise UserError(f"{path}: {len(self.tokens)} tokens is less than one window of {seq_len + 1}")
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def window_ids(self, sample_ids: np.ndarray) -> np.ndarray:
        epochs, within = np.divmod(sample_ids, self.n_windows)
        out = np.empty_like(sample_ids)
        for epoch in np.unique(epochs):
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.n_windows)
                self._perm_epoch = int(epoch)
            sel = epochs == epoch
            out[sel] = self._perm[within[sel]]
        return out

    def batch(self, sample_ids: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, seq_len) inputs and targets for the given sample numbers."""
        starts = self.window_ids(sample_ids) * self.seq_len
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        data = torch.from_numpy(rows).to(device, non_blocking=True)
        return data[:, :-1], data[:, 1:]

    def sequential(self, batch_size: int, n_batches: int, device: torch.device):
        """The first n_batches * batch_size windows in file order: a fixed validation set."""
        for b in range(min(n_batches, max(1, self.n_windows // batch_size))):
            ids = np.arange(b * batch_size, min((b + 1) * batch_size, self.n_windows))
            rows = np.stack([self.tokens[i * self.seq_len : i * self.seq_len + self.seq_len + 1] for i in ids])
            data = torch.from_numpy(rows.astype(np.int64)).to(device)
            yield data[:, :-1], data[:, 1:]


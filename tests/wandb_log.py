"""Read back what an offline W&B run recorded, from its ``run-<id>.wandb`` file.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic, version), then LevelDB-style
32 KiB blocks of chunks (crc32, length, type: full/first/middle/last), each record a
``wandb_internal_pb2.Record``. wandb no longer ships a Python reader, so the tests carry this one.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK, CHUNK_HEADER, FILE_HEADER = 32 * 1024, 7, 7
FULL, FIRST, LAST = 1, 2, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, parts = FILE_HEADER, []
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER]) if left_in_block >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left_in_block
            continue
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        parts = [chunk] if kind in (FULL, FIRST) else [*parts, chunk]
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def _put(tree: dict, item, value) -> None:
    """An item names its key as ``key`` or as a path ``nested_key`` (a logged dict, e.g. an image)."""
    *parents, last = list(item.nested_key) or [item.key]
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


def read_offline_run(run_dir: Path) -> dict:
    """The run (name, group, job_type, tags, id), its config, the history keys, the final summary and
    the artifacts logged, from the one offline run under ``run_dir``/wandb."""
    runs = read_offline_runs(run_dir)
    assert len(runs) == 1, f"expected one offline W&B run under {run_dir}, found {len(runs)}"
    return runs[0]


def read_offline_runs(run_dir: Path) -> list[dict]:
    """Every offline run log under ``run_dir``/wandb, oldest first (a run resumed offline writes a log of its own,
    under the same run id; ``wandb sync`` uploads them in order into one run)."""
    logs = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))  # named offline-run-<start time>-<id>
    return [_read_log(log) for log in logs]


def _read_log(log: Path) -> dict:
    # wandb's service process may still be flushing the log when finish() returns: wait for the
    # exit record, the last one written.
    deadline = time.time() + 30
    while not any(r.WhichOneof("record_type") == "exit" for r in records(log)):
        assert time.time() < deadline, f"{log} has no exit record: the run did not finish"
        time.sleep(0.5)
    out = {"config": {}, "history_keys": set(), "summary": {}, "artifacts": [], "history": []}
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(name=run.display_name, group=run.run_group, job_type=run.job_type, tags=list(run.tags))
            out["id"] = run.run_id
            out["config"].update({item.key: json.loads(item.value_json) for item in run.config.update})
        elif kind == "config":
            out["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {}
            for item in record.history.item:
                _put(row, item, json.loads(item.value_json))
            out["history"].append(row)
            out["history_keys"] |= {k for k in row if not k.startswith("_")}
        elif kind == "summary":
            for item in record.summary.update:
                _put(out["summary"], item, json.loads(item.value_json))
        elif kind == "artifact":
            art = record.artifact
            files = [entry.path for entry in art.manifest.contents]
            out["artifacts"].append({"name": art.name, "type": art.type, "aliases": list(art.aliases), "files": files})
    return out

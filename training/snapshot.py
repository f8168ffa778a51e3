"""Versioned, content-addressed snapshots of derived training data.

Layout: `<project_dir>/snapshots/<round:04d>-<hash12>/{pairs.jsonl, sft.jsonl, manifest.json}`.
A snapshot is written into a hidden temp dir next to its final place and renamed into view only when
complete, so readers never see half a snapshot: they list only `NNNN-<hash>` dirs holding a manifest.
Writes for one project are serialized by the caller (the per-project training lock); a crashed write
leaves only a temp dir, removed by the next write.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from backend.projects import fsync_directory

from .preferences import DerivedData, PreferencePair, SftExample

SNAPSHOTS_DIR = "snapshots"
PAIRS_FILE = "pairs.jsonl"
SFT_FILE = "sft.jsonl"
MANIFEST_FILE = "manifest.json"
TEMP_PREFIX = ".tmp-"
HASH_CHARS = 12
_SNAPSHOT_NAME = re.compile(r"^(\d{4,})-([0-9a-f]{%d})$" % HASH_CHARS)


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    round: int
    content_hash: str
    counts: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


# --- writing --------------------------------------------------------------------------------------


def write_snapshot(project_dir: Path, derived: DerivedData, meta: dict[str, Any]) -> SnapshotInfo:
    """Write `derived` as the next round, or return the latest snapshot when its content is the same."""
    root = Path(project_dir) / SNAPSHOTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(root)
    pairs_bytes = to_jsonl(dataclasses.asdict(p) for p in derived.pairs)
    sft_bytes = to_jsonl(dataclasses.asdict(e) for e in derived.sft)
    content_hash = hash_content(pairs_bytes, sft_bytes)
    latest = latest_snapshot(project_dir)
    if latest is not None and latest.content_hash == content_hash:
        return latest
    round_number = latest.round + 1 if latest else 1
    manifest = {
        "round": round_number,
        "content_hash": content_hash,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "counts": derived.counts,
        "agreement": derived.stats.summary(),
        "meta": meta,
        "files": {PAIRS_FILE: len(derived.pairs), SFT_FILE: len(derived.sft)},
    }
    final = root / f"{round_number:04d}-{content_hash[:HASH_CHARS]}"
    _publish(root, final, {PAIRS_FILE: pairs_bytes, SFT_FILE: sft_bytes, MANIFEST_FILE: _json_bytes(manifest)})
    return _info(final)


def _publish(root: Path, final: Path, files: dict[str, bytes]) -> None:
    temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root))
    for name, data in files.items():  # the manifest last: a dir with a manifest is a whole snapshot
        _write_synced(temp / name, data)
    fsync_directory(temp)
    os.rename(temp, final)
    fsync_directory(root)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def remove_stale_temp_dirs(root: Path) -> None:
    for entry in root.glob(TEMP_PREFIX + "*"):
        shutil.rmtree(entry, ignore_errors=True)


def to_jsonl(records) -> bytes:
    """One record a line, keys sorted: the same data always gives the same bytes (and hash)."""
    lines = (json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")) for r in records)
    return "".join(line + "\n" for line in lines).encode("utf-8")


def hash_content(pairs_bytes: bytes, sft_bytes: bytes) -> str:
    digest = hashlib.sha256(pairs_bytes)
    digest.update(b"\0")  # JSONL never holds a NUL byte, so the boundary between the files is unambiguous
    digest.update(sft_bytes)
    return digest.hexdigest()


def label_config_hash(label_config_xml: str) -> str:
    """For `meta`: which labeling config the data was derived under."""
    return hashlib.sha256(label_config_xml.encode("utf-8")).hexdigest()


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, sort_keys=True, ensure_ascii=False, indent=2, default=str) + "\n").encode("utf-8")


# --- reading --------------------------------------------------------------------------------------


def list_snapshots(project_dir: Path) -> list[SnapshotInfo]:
    """Complete snapshots, oldest round first."""
    root = Path(project_dir) / SNAPSHOTS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        if _SNAPSHOT_NAME.match(entry.name) and (entry / MANIFEST_FILE).is_file():
            found.append(_info(entry))
    return sorted(found, key=lambda info: info.round)


def latest_snapshot(project_dir: Path) -> SnapshotInfo | None:
    snapshots = list_snapshots(project_dir)
    return snapshots[-1] if snapshots else None


def snapshot_at(path: Path) -> SnapshotInfo:
    """The snapshot in `path` (a directory `write_snapshot` published)."""
    return _info(Path(path))


def read_manifest(info: SnapshotInfo) -> dict[str, Any]:
    return json.loads((info.path / MANIFEST_FILE).read_text(encoding="utf-8"))


def read_pairs(info: SnapshotInfo) -> list[PreferencePair]:
    return [PreferencePair(**record) for record in _read_jsonl(info.path / PAIRS_FILE)]


def read_sft(info: SnapshotInfo) -> list[SftExample]:
    return [SftExample(**record) for record in _read_jsonl(info.path / SFT_FILE)]


def _info(path: Path) -> SnapshotInfo:
    manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    return SnapshotInfo(
        path=path,
        round=manifest["round"],
        content_hash=manifest["content_hash"],
        counts=manifest["counts"],
        meta=manifest.get("meta") or {},
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]

"""Shared test setup: everything offline, Hub cache in a private temporary folder.

The environment is set before any test module imports huggingface_hub, whose constants are read at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="snapgen-tests-hf-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # shared modules (_sd3_fixtures) for tests/*/ too

# Tests run tiny models, often two pytest workers at once: one intra-op thread each is several times faster
# than oversubscribed cores.
torch.set_num_threads(1)

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_hub_cache(folder: str | Path, repo_id: str, with_tree_listing: bool = False) -> Path:
    """Lay ``folder`` out as a downloaded Hub snapshot of ``repo_id`` in the default cache:
    ``models--org--name/snapshots/<rev>/...`` + ``refs/main``. With ``with_tree_listing``, also write the
    ``trees/<rev>.json`` listing that an online ``snapshot_download`` leaves, which makes diffusers take its
    full offline path (file-pattern checks included). Returns the snapshot folder."""
    from huggingface_hub import constants

    org, name = repo_id.split("/")
    repo_dir = Path(constants.HF_HUB_CACHE) / f"models--{org}--{name}"
    snapshot = repo_dir / "snapshots" / FAKE_COMMIT
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(FAKE_COMMIT)
    if with_tree_listing:
        files = {}
        for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
            data = path.read_bytes()
            files[path.relative_to(snapshot).as_posix()] = {
                "size": len(data),
                "blob_id": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
            }
        (repo_dir / "trees").mkdir()
        (repo_dir / "trees" / f"{FAKE_COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": files}))
    return snapshot


@pytest.fixture(scope="session")
def saved_pipeline(tmp_path_factory) -> Path:
    """A tiny SnapGen pipeline (CLIP-L + CLIP-G, tiny decoder) saved with ``save_pretrained``; do not modify."""
    from diffusers_snapgen.testing import tiny_pipeline

    folder = tmp_path_factory.mktemp("saved") / "tiny-snapgen"
    tiny_pipeline("clip", "tiny").save_pretrained(folder)
    return folder


@pytest.fixture
def pipeline_copy(saved_pipeline, tmp_path) -> Path:
    """A private, modifiable copy of :func:`saved_pipeline`."""
    return Path(shutil.copytree(saved_pipeline, tmp_path / "copy"))

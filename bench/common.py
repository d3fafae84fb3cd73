"""What several benchmarks share: compiled modules as artifact directories, so that the
side-by-side protocol (``harlflow.measure``) can time them in its worker processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def as_artifact(lib, directory: Path, imported, target: dict) -> Path:
    """``lib`` (a compiled Relax executable of ``imported``) as a directory the measuring worker
    loads: ``model.so``, a manifest with the signature and target, the reference inputs."""
    from tasks.packaging import export_library

    directory.mkdir(parents=True, exist_ok=True)
    export_library(lib, directory / "model.so")
    manifest = {
        "inputs": [s.to_dict() for s in imported.inputs],
        "outputs": [s.to_dict() for s in imported.outputs],
        "target": target,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(imported.reference_path, directory / "reference.npz")
    return directory

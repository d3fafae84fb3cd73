"""What several benchmarks share: compiled modules as artifact directories, so that the
side-by-side protocol (``harlflow.measure``) can time them in its worker processes, and models
tuned and packaged the way the pipeline does."""

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


def tuned_artifact(imported, target: dict, work: Path, label: str, trials: int):
    """``imported`` tuned from an empty database (``work/db-LABEL``) with ``trials`` trials
    (evolutionary, seed 0) and packaged, unmeasured, under ``work/art-LABEL``: (the artifact
    directory, the tuning result)."""
    from harl import compilation, tuning
    from tasks.importing import to_relax
    from tasks.packaging import package

    db = work / f"db-{label}"
    mod = compilation.prepare(to_relax(imported.onnx_path, imported.inputs))
    result = tuning.tune(mod, target, db, strategy="evolutionary", seed=0, trials=trials)
    art = package(
        imported, target, database_dir=db, home=work / f"art-{label}",
        tune_summary=result.summary(), measure=False, log=lambda *_: None,
    )  # fmt: skip
    return art.directory, result


def store_minutes(text: str) -> tuple[Path, list[float]] | None:
    """``STORE.db@MIN[,MIN]`` → (the store, the minutes), or None when malformed or missing."""
    path, _, minutes = text.rpartition("@")
    try:
        mins = [float(x) for x in minutes.split(",")]
    except ValueError:
        return None
    return (Path(path), mins) if mins and Path(path).is_file() else None

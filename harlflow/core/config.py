"""Where the embedded stores live (``HARLFLOW_HOME``, default ``./artifacts``), read per call."""

from __future__ import annotations

import os
import re
from pathlib import Path

from harlflow.core.errors import BadInputError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def home() -> Path:
    """The embedded store's root: ``$HARLFLOW_HOME`` or ``./artifacts``, absolute."""
    return Path(os.environ.get("HARLFLOW_HOME") or "artifacts").resolve()


def tuning_db_dir() -> Path:
    """The home's own MetaSchedule database (JSON files), every run on this home reuses."""
    return home() / "tuning_db"


DATABASE_SCHEMES = ("postgresql", "sqlite")
"""the databases a tuning store can live in (``harl.sql_database``)"""


def is_database_url(location) -> bool:
    """Whether a tuning-store location is a database URL (``postgresql[+driver]://…``,
    ``sqlite:///…``); else it is a directory of MetaSchedule's JSON files."""
    if not isinstance(location, str) or "://" not in location:
        return False
    return location.split("://", 1)[0].split("+")[0] in DATABASE_SCHEMES


def check_sqlite_folder(url: str, name: str) -> None:
    """A ``sqlite[+driver]:///PATH`` URL whose file's directory does not exist: a
    ``BadInputError`` starting with ``name`` (not a passing fault, so nothing to retry). Other
    URLs, and in-memory sqlite, pass."""
    scheme, _, rest = url.partition("://")
    if scheme.split("+")[0] != "sqlite":
        return
    path = rest.removeprefix("/").split("?")[0]  # sqlite:///relative, sqlite:////absolute
    if not path or path == ":memory:":
        return
    folder = Path(path).expanduser().parent
    if not folder.is_dir():
        raise BadInputError(f"{name}: no directory {folder}")


def tuning_db() -> str | Path:
    """The tuning store runs read and write: ``$HARLFLOW_TUNING_DB`` (a database URL a team
    shares: ``postgresql://user:pw@host/db``, or ``sqlite:///path``), else the home's JSON
    database (:func:`tuning_db_dir`)."""
    url = os.environ.get("HARLFLOW_TUNING_DB")
    if not url:
        return tuning_db_dir()
    if not is_database_url(url):
        raise BadInputError(
            f"HARLFLOW_TUNING_DB={url.split('@')[-1]!r}: expected postgresql://USER:PW@HOST/DB "
            "or sqlite:///PATH"
        )
    check_sqlite_folder(url, f"HARLFLOW_TUNING_DB={url!r}")
    return url


def machine_cache_dir() -> Path:
    """What this machine measured about itself, shared by every home on it (a target's
    profile: ``harl.calibration``): ``$HARLFLOW_MACHINE_CACHE``, else
    ``$XDG_CACHE_HOME/harlflow``, else ``~/.cache/harlflow``."""
    if os.environ.get("HARLFLOW_MACHINE_CACHE"):
        return Path(os.environ["HARLFLOW_MACHINE_CACHE"]).resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).resolve() / "harlflow"


def harl_agent_path() -> Path:
    """HARL's agent weights: loaded at the start of a run, saved at its end (warm start)."""
    return home() / "harl" / "agent.pt"


def cost_model_path() -> Path:
    """The team's learned cost model (``harlflow cost-model train`` writes it); what
    ``--cost-model transfer`` starts from when it exists (else the model the package ships)."""
    return home() / "cost_model" / "model.pt"


def cost_model_records() -> Path:
    """The store's tuning records as a cost-model dataset (``harlflow cost-model train``)."""
    return home() / "cost_model" / "records.parquet"


def dataset_path() -> Path:
    """Where ``harlflow dataset generate`` collects the workload suite's measured programs."""
    return home() / "datasets" / "suite.parquet"


def dataset_work_dir() -> Path:
    """``harlflow dataset generate``'s per-target tuning databases (kept: a rerun resumes)."""
    return home() / "datasets" / "work"


def xrlflow_agent_path() -> Path:
    """The X-RLflow agent used by ``--rewrite xrlflow`` (``harlflow rewrite-train`` writes it)."""
    return home() / "xrlflow" / "agent.pt"


def rlflow_agent_path() -> Path:
    """The RLFlow world model and controller used by ``--rewrite rlflow``
    (``harlflow rewrite-train --agent rlflow`` writes it)."""
    return home() / "xrlflow" / "rlflow.pt"


def rewrite_dir() -> Path:
    """Rewritten models, content-addressed (each with the original model's reference outputs)."""
    return home() / "rewrites"


def import_cache_dir() -> Path:
    return home() / "cache" / "import"


def sources_cache_dir() -> Path:
    """Model files that retuning downloaded from an S3 source, content-addressed."""
    return home() / "cache" / "sources"


def mlflow_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a sqlite store under the home."""
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri()


def embedded_tracking_uri() -> str:
    """The embedded default store: sqlite under the home."""
    return f"sqlite:///{home() / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    """Artifact root for experiments harlflow creates on the embedded store."""
    return (home() / "mlruns").as_uri()


def validate_name(name: str, what: str = "model name") -> str:
    """Names reach file paths, S3 keys and the MLflow registry: letters, digits, ``._-`` only."""
    if not _NAME.match(name or "") or ".." in name:
        raise BadInputError(
            f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name

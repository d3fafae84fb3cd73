"""The run journal: what lets the same tuning command resume after a crash (``kill -9``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from harlflow.core.targets import target_key


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class RunJournal:
    """Marks a tuning run in progress, so the same command after a crash resumes.

    Written once when a run starts (the tasks it tunes and the database's record count for
    them) and removed when it ends. The database itself says how many trials were measured
    since: those count against the budget and are not measured again. The journal's name is a
    hash of the tasks, the target and the run's settings: another command never resumes it.
    """

    def __init__(self, database_dir: str | Path, tasks, target: dict[str, Any], **settings):
        key = json.dumps(
            {
                "tasks": [[t.task_name, _digest(t.dispatched[0].script())] for t in tasks],
                "target": target_key(target),
                **settings,
            },
            sort_keys=True,
        )
        self.path = Path(database_dir) / "runs" / f"{_digest(key)[:20]}.json"

    def load(self) -> dict[str, Any] | None:
        """The interrupted run's journal (``{"tasks": [...], "records": n}``), or None."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def start(self, task_names: list[str], records: int) -> None:
        """Record that a run of these tasks starts with ``records`` records in the database."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"tasks": task_names, "records": records}))
        tmp.replace(self.path)

    def finish(self) -> None:
        """The run ended (finished or failed cleanly): nothing to resume."""
        self.path.unlink(missing_ok=True)

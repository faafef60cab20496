"""Fixtures for the job store suite: one `backend` per store kind, each on a fresh database.

SQLite: a file in the test's tmp_path. PostgreSQL: a schema `casola_test_<random>` on the server
named by CASOLA_TEST_PG_DSN (default: the local trust-auth server), dropped after the test, so runs
in parallel and leftovers never collide. When the server cannot be reached the PostgreSQL cases
skip with the reason, unless the run requires `postgresql` (tests/require.py: CASOLA_TEST_REQUIRE=all
in CI), which makes that a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from casola.store import JobStore
from casola.store.postgres import PostgresJobStore
from casola.store.sqlite import SqliteJobStore
from tests.require import missing

__all__ = ["PG_DSN", "Backend"]

PG_DSN = os.environ.get("CASOLA_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
_pg_unreachable: list[str] = []  # the reason, once a connection attempt failed in this session


class Backend:
    """Makes store instances on one database: several instances act as several queue nodes."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name = name
        self.path = str(tmp_path / "jobs.db")
        self.schema = f"casola_test_{uuid.uuid4().hex[:12]}"
        self.stores: list[JobStore] = []

    def new(self) -> JobStore:
        """A store instance on this backend's database, not opened (closed at teardown)."""
        store: JobStore
        if self.name == "sqlite":
            store = SqliteJobStore(self.path)
        else:
            store = PostgresJobStore(PG_DSN, schema=self.schema, min_size=1, max_size=8)
        self.stores.append(store)
        return store

    async def make(self) -> JobStore:
        """A store instance on this backend's database, opened."""
        store = self.new()
        await store.open()
        return store

    async def versions(self) -> list[tuple[int, str]]:
        """The rows of casola_schema_version, read without the store."""
        if self.name == "sqlite":
            import sqlite3

            with sqlite3.connect(self.path) as conn:
                return list(conn.execute("SELECT version, name FROM casola_schema_version ORDER BY version"))
        import asyncpg  # type: ignore[import-untyped]

        conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": self.schema})
        try:
            rows = await conn.fetch("SELECT version, name FROM casola_schema_version ORDER BY version")
        finally:
            await conn.close()
        return [(row[0], row[1]) for row in rows]

    async def aclose(self) -> None:
        for store in self.stores:
            await store.close()
        if self.name == "postgres":
            import asyncpg

            conn = await asyncpg.connect(PG_DSN)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            finally:
                await conn.close()


async def _require_postgres() -> None:
    import asyncpg

    if not _pg_unreachable:
        try:
            conn = await asyncpg.connect(PG_DSN, timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            _pg_unreachable.append(f"PostgreSQL not reachable at {PG_DSN} ({exc!r}); set CASOLA_TEST_PG_DSN")
        else:
            await conn.close()
            _pg_unreachable.append("")
    if _pg_unreachable[0]:
        missing("postgresql", _pg_unreachable[0])


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "postgres":
        await _require_postgres()
    backend = Backend(request.param, tmp_path)
    try:
        yield backend
    finally:
        await backend.aclose()


@pytest_asyncio.fixture
async def store(backend: Backend) -> JobStore:
    return await backend.make()

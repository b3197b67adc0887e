import torch

torch.set_num_threads(2)


# --------------------------------------------------------------------------
# A real PostgreSQL server (see tests/postgres_server.py)
# --------------------------------------------------------------------------
import re as _re  # noqa: E402
import uuid as _uuid  # noqa: E402

import pytest  # noqa: E402
from postgres_server import PostgresServer  # noqa: E402


@pytest.fixture(scope="session")
def postgres_server():
    """A started, private PostgreSQL server on 127.0.0.1; stopped at session end."""
    ok, reason = PostgresServer.available()
    if not ok:
        pytest.skip(f"PostgreSQL not available: {reason}")
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server, request):
    """SQLAlchemy URL of a fresh, empty database for this test:
    postgresql+psycopg2://postgres@127.0.0.1:PORT/NAME"""
    stem = _re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    return postgres_server.create_database(f"t_{stem}_{_uuid.uuid4().hex[:10]}")

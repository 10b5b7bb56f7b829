"""Monthly partitions of the ledger on PostgreSQL, so old months leave by DETACH + DROP instead of a mass
DELETE on the hot table (no index bloat, no long locks). SQLite keeps one table."""
from datetime import date

from django.db import connection, connections

TABLE = "ledger_ledgerentry"


def _month(d: date) -> date:
    return d.replace(day=1)


def _next(d: date) -> date:
    return (d.replace(day=28) + (date(2000, 1, 5) - date(2000, 1, 1))).replace(day=1)


def partition_name(month: date) -> str:
    return f"{TABLE}_p{month:%Y_%m}"


def is_partitioned() -> bool:
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid WHERE c.relname = %s", [TABLE])
        return cursor.fetchone() is not None


def ensure_partitions(*, start: date, months_ahead: int = 2, cursor=None) -> list[str]:
    """Create the monthly partitions from `start`'s month to `months_ahead` months past today's. Safe to repeat."""
    created, month, last = [], _month(start), max(_month(date.today()), _month(start))
    for _ in range(months_ahead):
        last = _next(last)
    own_cursor = cursor is None
    # DDL runs as the schema's owner (DATABASE_OWNER_URL) where the application's role owns nothing.
    cursor = cursor or connections["owner" if "owner" in connections.databases else "default"].cursor()
    try:
        while month <= last:
            name = partition_name(month)
            cursor.execute(
                f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF "{TABLE}" '
                f"FOR VALUES FROM ('{month.isoformat()}') TO ('{_next(month).isoformat()}')"
            )
            created.append(name)
            month = _next(month)
    finally:
        if own_cursor:
            cursor.close()
    return created


def partitions_before(month: date) -> list[tuple[str, date]]:
    """Existing monthly partitions wholly before `month`."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = %s AND c.relname LIKE %s",
            [TABLE, f"{TABLE}_p%"],
        )
        names = [row[0] for row in cursor.fetchall()]
    found = []
    for name in names:
        year, mon = name.rsplit("_p", 1)[1].split("_")
        start = date(int(year), int(mon), 1)
        if start < _month(month):
            found.append((name, start))
    return sorted(found, key=lambda item: item[1])


def drop_partition(name: str) -> None:
    with connection.cursor() as cursor:
        # Deferred foreign-key checks still pending in this transaction would block the DROP: run them now.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute(f'ALTER TABLE "{TABLE}" DETACH PARTITION "{name}"')
        cursor.execute(f'DROP TABLE "{name}"')

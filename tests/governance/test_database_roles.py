"""The application's database role (deploy/postgres/app-role.sql, what docker-compose connects as) reads
and writes rows but cannot get rid of the audit trail: no TRUNCATE, no UPDATE or DELETE (the trigger), and no
way to switch the trigger off (not the owner, not a superuser)."""
import shutil
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.db import connection

from governance.audit import audit_record

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
SQL = Path(__file__).resolve().parents[2] / "deploy" / "postgres" / "app-role.sql"


@pytest.fixture
def app_role():
    if not shutil.which("psql"):
        pytest.skip("psql is not installed")
    db = settings.DATABASES["default"]
    role = f"tollgate_app_{uuid.uuid4().hex[:8]}"
    base = ["psql", "-v", "ON_ERROR_STOP=1", "-h", db["HOST"] or "127.0.0.1", "-p", str(db["PORT"] or 5432),
            "-U", db["USER"], "-d", connection.settings_dict["NAME"]]
    done = subprocess.run([*base, "-v", f"app_role={role}", "-v", "app_password=unused-with-trust-auth", "-f", str(SQL)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    conninfo = f"host={db['HOST'] or '127.0.0.1'} port={db['PORT'] or 5432} dbname={connection.settings_dict['NAME']} user={role}"
    yield conninfo
    subprocess.run([*base, "-c", f'DROP OWNED BY "{role}"; DROP ROLE "{role}"'], capture_output=True, text=True)


@pytest.mark.parametrize("statement", [
    "ALTER TABLE governance_auditevent DISABLE TRIGGER ALL",
    "ALTER TABLE governance_auditevent DISABLE TRIGGER governance_auditevent_no_update_delete",
    "TRUNCATE governance_auditevent",
    "SET session_replication_role = replica",
    "UPDATE governance_auditevent SET action = 'forged'",
    "DELETE FROM governance_auditevent",
    "DROP TRIGGER governance_auditevent_no_update_delete ON governance_auditevent",
])
def test_the_application_role_cannot_remove_or_unguard_the_audit_trail(app_role, person, statement):
    audit_record(actor=person, action="team.update", after={"x": 1})
    with psycopg.connect(app_role, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM governance_auditevent").fetchone()[0] == 1  # it can read
        with pytest.raises(psycopg.Error):
            conn.execute(statement)
        assert conn.execute("SELECT count(*), min(action) FROM governance_auditevent").fetchone() == (1, "team.update")


def test_the_application_role_writes_rows(app_role, person):
    with psycopg.connect(app_role, autocommit=True) as conn:
        conn.execute("UPDATE governance_person SET first_name = 'Changed' WHERE id = %s", [person.pk])
    person.refresh_from_db()
    assert person.first_name == "Changed"

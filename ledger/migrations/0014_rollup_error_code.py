"""Rollups carry the error code (refusals by reason, failures by upstream error on the usage dashboards), and
two indexes for the dashboards of an owner (by team) and an employee (by person)."""
import hashlib

from django.db import migrations, models

DIMENSIONS = ("team_id", "person_id", "key_id", "grant_path", "cost_center_id", "alias_id", "provider_model_id",
              "project", "feature", "environment", "experiment", "error_code")


def grains_with_error_code(apps, schema_editor):
    """The grain hashes every dimension (ledger.services.rollup_grain), so rows folded before get theirs again,
    with an empty error code, and the next fold adds to them instead of starting a second row of the grain.
    Their refusals and failures keep no reason: the ledger did not say it to the rollups then."""
    DailyRollup = apps.get_model("ledger", "DailyRollup")
    batch = []
    for row in DailyRollup.objects.order_by("pk").iterator(chunk_size=5000):
        parts = [str(row.day), str(row.utc_day),
                 *("\x00" if getattr(row, d) is None else str(getattr(row, d)) for d in DIMENSIONS)]
        row.grain = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
        batch.append(row)
        if len(batch) == 5000:
            DailyRollup.objects.bulk_update(batch, ["grain"])
            batch = []
    DailyRollup.objects.bulk_update(batch, ["grain"])


class Migration(migrations.Migration):

    dependencies = [
        ("ledger", "0013_reconciliation_you_can_sign"),
    ]

    operations = [
        migrations.AddField(
            model_name="dailyrollup",
            name="error_code",
            field=models.CharField(blank=True, default="", max_length=40),
        ),
        migrations.AddIndex(
            model_name="dailyrollup",
            index=models.Index(fields=["team", "day"], name="rollup_team_day_idx"),
        ),
        migrations.AddIndex(
            model_name="dailyrollup",
            index=models.Index(fields=["person", "day"], name="rollup_person_day_idx"),
        ),
        migrations.RunPython(grains_with_error_code, migrations.RunPython.noop),
    ]

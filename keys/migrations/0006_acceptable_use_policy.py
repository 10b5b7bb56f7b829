"""The acceptable-use policy: versions and who accepted which; the role groups get their permissions."""

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models

from governance.roles import sync_roles


class Migration(migrations.Migration):

    dependencies = [
        ('keys', '0005_admin_filter_indexes'),
        ('governance', '0012_roles_for_true_ups_and_billed_names'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name='AcceptableUsePolicy',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('version', models.CharField(help_text='E.g. 1, 2 or 2026-01.', max_length=20, unique=True)),
                ('text', models.TextField()),
                ('effective_from', models.DateField(default=django.utils.timezone.localdate, help_text='In force from this day on.')),
                ('created_at', models.DateTimeField(auto_now_add=True)),
            ],
            options={
                'verbose_name': 'acceptable-use policy version',
                'ordering': ['-effective_from', '-id'],
            },
        ),
        migrations.CreateModel(
            name='PolicyAcceptance',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('accepted_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('person', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='policy_acceptances', to=settings.AUTH_USER_MODEL)),
                ('policy', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='acceptances', to='keys.acceptableusepolicy')),
            ],
            options={
                'ordering': ['-accepted_at'],
                'constraints': [models.UniqueConstraint(fields=('person', 'policy'), name='policy_acceptance_once')],
            },
        ),
        migrations.RunPython(sync_roles, migrations.RunPython.noop),
    ]

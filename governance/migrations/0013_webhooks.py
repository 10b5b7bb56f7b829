"""Outgoing webhooks (issue 16): endpoints and their delivery log; role permissions re-synced so IT manages them
and finance and auditors read them."""
import uuid

import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models

import governance.roles


class Migration(migrations.Migration):

    dependencies = [
        ('governance', '0012_roles_for_true_ups_and_billed_names'),
    ]

    operations = [
        migrations.CreateModel(
            name='WebhookEndpoint',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('url', models.URLField(help_text='Receives a signed JSON POST for each event.', max_length=500)),
                ('description', models.CharField(blank=True, max_length=200)),
                ('events', models.JSONField(blank=True, default=list, help_text='Event names to send; empty: every event.')),
                ('secret_encrypted', models.TextField(editable=False)),
                ('is_active', models.BooleanField(default=True)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
            ],
            options={
                'ordering': ['url'],
            },
        ),
        migrations.CreateModel(
            name='WebhookDelivery',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('uuid', models.UUIDField(default=uuid.uuid4, editable=False, help_text="The body's id and X-Tollgate-Delivery.", unique=True)),
                ('event', models.CharField(db_index=True, max_length=64)),
                ('payload', models.JSONField(help_text="The body's data: ids, prefixes, names, amounts and links; never a secret.")),
                ('status', models.CharField(choices=[('pending', 'Pending'), ('delivered', 'Delivered'), ('failed', 'Failed')], db_index=True, default='pending', max_length=16)),
                ('attempts', models.PositiveIntegerField(default=0)),
                ('last_status_code', models.PositiveSmallIntegerField(blank=True, null=True)),
                ('last_error', models.CharField(blank=True, max_length=500)),
                ('created_at', models.DateTimeField(db_index=True, default=django.utils.timezone.now)),
                ('delivered_at', models.DateTimeField(blank=True, null=True)),
                ('endpoint', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='deliveries', to='governance.webhookendpoint')),
            ],
            options={
                'verbose_name_plural': 'webhook deliveries',
                'ordering': ['-id'],
            },
        ),
        migrations.RunPython(governance.roles.sync_roles, migrations.RunPython.noop),
    ]

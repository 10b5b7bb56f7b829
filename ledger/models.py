"""The ledger: one entry per relay call, refused and failed calls included. Rows are small: catalog data
(names, prices) are referenced, not copied."""
from decimal import Decimal

from django.conf import settings
from django.db import models


class LedgerEntryQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise PermissionError("ledger entries are immutable: record an adjustment instead")

    def delete(self):
        raise PermissionError("ledger entries are immutable: record an adjustment instead")


class LedgerEntry(models.Model):
    class Outcome(models.TextChoices):
        OK = "ok", "Served"
        REFUSED = "refused", "Refused by policy"
        UPSTREAM_ERROR = "upstream_error", "Upstream error"
        CLIENT_ABORT = "client_abort", "Client disconnected"
        ADJUSTMENT = "adjustment", "Adjustment by finance"

    # Indexes cost bytes on every row of the largest table: only what lookups need. Foreign keys that the
    # composite indexes below already lead with, or that reports reach through the rollups, carry none.
    # Nor do they carry database constraints: a constraint makes every insert look up and lock (FOR KEY
    # SHARE) the key, person, team, grant, ... rows that every concurrent call of that team also locks, and
    # would refuse the row of a call whose key was deleted meanwhile. The rows they point to are never
    # deleted while entries point to them: on_delete=PROTECT refuses it (Django checks, not the database).
    request_id = models.CharField(max_length=64)
    # No index of its own: months are partitions (pruned by created_at), lookups by key or team use the
    # composite indexes, and lists order by id, which follows time.
    created_at = models.DateTimeField()
    key = models.ForeignKey("keys.VirtualKey", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                            db_index=False, db_constraint=False)
    person = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                               db_index=False, db_constraint=False)
    team = models.ForeignKey("governance.Team", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                             db_index=False, db_constraint=False)
    grant = models.ForeignKey("budgets.Grant", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                              db_index=False, db_constraint=False, help_text="The most specific grant the call was charged to.")
    # Every grant charged, as ",3,7,12,": the counters are rebuilt and checked from this (LIKE works everywhere).
    grant_path = models.CharField(max_length=200, blank=True, default="")
    cost_center = models.ForeignKey("governance.CostCenter", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                                    db_index=False, db_constraint=False)
    tags = models.JSONField(default=dict, blank=True)
    model_requested = models.CharField(max_length=120, blank=True)
    alias = models.ForeignKey("gateway.ModelAlias", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                              db_index=False, db_constraint=False)
    provider_model = models.ForeignKey("gateway.ProviderModel", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                                       db_index=False, db_constraint=False)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=8, default=Decimal("0"))
    latency_ms = models.PositiveIntegerField(default=0)
    upstream_latency_ms = models.PositiveIntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    http_status = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=40, blank=True)
    detail = models.CharField(max_length=200, blank=True, help_text="Why a call was refused or failed.")
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    streamed = models.BooleanField(default=False)
    # No database constraint: on PostgreSQL the table is partitioned by month, and a partitioned table's
    # id alone cannot be the target of a foreign key (its primary key is (id, created_at)).
    corrects = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="adjustments",
                                 db_constraint=False, db_index=False,
                                 help_text="For an adjustment: the entry it corrects.")

    objects = LedgerEntryQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "ledger entries"
        constraints = [
            # A call's identity: the relay's writes are idempotent on it (INSERT ... ON CONFLICT DO NOTHING),
            # so a row written again (a retry after an unknown outcome, a journal replayed) is never charged
            # twice. created_at is part of it because the table is partitioned by it on PostgreSQL; a call
            # keeps its created_at from its first write to its last. Also serves lookups by request id.
            models.UniqueConstraint(fields=["request_id", "created_at"], name="ledger_call_once"),
        ]
        indexes = [
            models.Index(fields=["key", "created_at"], name="ledger_key_time_idx"),
            models.Index(fields=["team", "created_at"], name="ledger_team_time_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.outcome} {self.cost}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise PermissionError("ledger entries are immutable: record an adjustment instead")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise PermissionError("ledger entries are immutable: record an adjustment instead")


class CallBody(models.Model):
    """Prompt and response of one call, kept only when the key's or team's policy says so, and deleted
    after TOLLGATE_BODY_RETENTION_DAYS by a beat task. Separate from LedgerEntry to keep ledger rows small."""

    entry = models.OneToOneField(LedgerEntry, on_delete=models.CASCADE, primary_key=True, related_name="body",
                                 db_constraint=False)  # see LedgerEntry.corrects
    created_at = models.DateTimeField(db_index=True)
    mode = models.CharField(max_length=8)
    request = models.TextField()
    response = models.TextField(blank=True)

    class Meta:
        verbose_name = "call body"
        verbose_name_plural = "call bodies"

    def __str__(self) -> str:
        return f"body of {self.entry_id}"


class DailyRollup(models.Model):
    """Spend per day x team x person x key x grant path x model (alias and provider model) x cost center x tag
    set, kept current by a beat task (ledger.services.ledger_rollup). Every report reads these, never the raw
    ledger. `day` is the local day (TIME_ZONE), for chargeback; `utc_day` the UTC day, for reconciliation
    (providers bill by UTC day): a local day's entries fall in at most two UTC days, so at most two rows."""

    day = models.DateField()
    utc_day = models.DateField()
    team = models.ForeignKey("governance.Team", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    person = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    key = models.ForeignKey("keys.VirtualKey", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    grant_path = models.CharField(max_length=200, blank=True, default="")
    cost_center = models.ForeignKey("governance.CostCenter", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    alias = models.ForeignKey("gateway.ModelAlias", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    provider_model = models.ForeignKey("gateway.ProviderModel", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    project = models.CharField(max_length=64, blank=True)
    feature = models.CharField(max_length=64, blank=True)
    environment = models.CharField(max_length=64, blank=True)
    experiment = models.CharField(max_length=64, blank=True)
    # Why calls were refused or failed (the ledger's error_code; empty for served calls), so the dashboards
    # count refusals by reason and failures by upstream error from the rollups. It splits a grain only where
    # a day had refused or failed calls, a few more rows; reading the ledger instead would scan every entry of
    # the period for Finance's view (no index leads with time or outcome): seconds at 10M entries.
    error_code = models.CharField(max_length=40, blank=True, default="")
    # The grain's identity (ledger.services.rollup_grain): one row per grain, upserted (INSERT ... ON CONFLICT
    # DO UPDATE adds), which a unique constraint over nullable columns could not guarantee on every database.
    grain = models.CharField(max_length=32, unique=True)
    calls = models.PositiveIntegerField(default=0, help_text="Calls served or failed: refused calls are counted apart.")
    refused = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0, help_text="Upstream errors and client disconnects.")
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    cost = models.DecimalField(max_digits=18, decimal_places=8, default=Decimal("0"))

    class Meta:
        indexes = [models.Index(fields=["day"], name="rollup_day_idx"),
                   models.Index(fields=["utc_day"], name="rollup_utc_day_idx"),
                   # The usage dashboards of an owner (their teams) and of an employee (their own spend).
                   models.Index(fields=["team", "day"], name="rollup_team_day_idx"),
                   models.Index(fields=["person", "day"], name="rollup_person_day_idx")]

    def __str__(self) -> str:
        return f"{self.day} {self.team_id} {self.cost}"


class RollupState(models.Model):
    """How far the rollups have read the ledger (one row)."""

    last_entry_id = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)


class ProviderCostImport(models.Model):
    """One provider cost or usage file, uploaded or fetched from the provider's API. Stored first and parsed
    by a Celery task (ledger.costfiles); all its lines are imported or none. A day it covers replaces the
    lines of that day imported before (a provider restating a day), and the report says what changed."""

    class Source(models.TextChoices):
        OPENAI_COSTS = "openai_costs", "OpenAI costs API (JSON)"
        OPENAI_USAGE = "openai_usage", "OpenAI usage API, completions (JSON, tokens)"
        OPENAI_DASHBOARD_CSV = "openai_dashboard_csv", "OpenAI usage dashboard cost export (CSV)"
        ANTHROPIC_COSTS = "anthropic_costs", "Anthropic cost report (JSON)"
        ANTHROPIC_CONSOLE_CSV = "anthropic_console_csv", "Anthropic console cost export (CSV)"
        CSV = "csv", "CSV (date, provider, model, project, tokens, amount[, currency])"

    class Status(models.TextChoices):
        PENDING = "pending", "Waiting to be read"
        RUNNING = "running", "Reading"
        DONE = "done", "Imported"
        FAILED = "failed", "Refused: nothing imported"

    provider = models.ForeignKey("gateway.Provider", on_delete=models.PROTECT, related_name="+")
    source = models.CharField(max_length=24, choices=Source.choices, blank=True, help_text="Detected from the content.")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    file = models.FileField(upload_to="cost-imports/%Y/%m/", blank=True)
    file_name = models.CharField(max_length=200)
    size = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64)
    progress = models.BigIntegerField(default=0, help_text="Lines read so far.")
    read = models.BigIntegerField(default=0, help_text="Lines in the file.")
    lines = models.BigIntegerField(default=0, help_text="Lines imported.")
    replaced = models.BigIntegerField(default=0, help_text="Lines of earlier imports replaced by this one.")
    rejected = models.BigIntegerField(default=0)
    report = models.JSONField(default=dict, blank=True, help_text="Days changed and lines rejected, with reasons.")
    error = models.CharField(max_length=500, blank=True)
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["provider", "sha256"], condition=~models.Q(status="failed"),
                                               name="cost_import_once")]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.file_name} ({self.get_status_display()}, {self.lines} lines)"


class ProviderCostLine(models.Model):
    """One line of what a provider billed (measure "cost") or counted (measure "usage", tokens) for a UTC day."""

    class Measure(models.TextChoices):
        COST = "cost", "Cost"
        USAGE = "usage", "Usage (tokens)"

    source_import = models.ForeignKey(ProviderCostImport, on_delete=models.CASCADE, related_name="cost_lines")
    provider = models.ForeignKey("gateway.Provider", on_delete=models.PROTECT, related_name="+")
    measure = models.CharField(max_length=5, choices=Measure.choices, default=Measure.COST)
    day = models.DateField(help_text="The UTC day of the provider's bucket.")
    model = models.CharField(max_length=120, blank=True, help_text="As billed (matched through the billed names table).")
    project = models.CharField(max_length=120, blank=True, help_text="Project or workspace.")
    description = models.CharField(max_length=200, blank=True, help_text="The provider's line item.")
    api_key = models.CharField(max_length=120, blank=True)
    token_type = models.CharField(max_length=40, blank=True)
    service_tier = models.CharField(max_length=40, blank=True)
    currency = models.CharField(max_length=3, blank=True)
    tokens = models.BigIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    amount = models.DecimalField(max_digits=18, decimal_places=8, default=Decimal("0"))
    line_key = models.CharField(max_length=64, help_text="The provider's line identity (bucket, line item, project, "
                                                         "API key, token type, service tier, currency).")

    class Meta:
        indexes = [models.Index(fields=["provider", "measure", "day"], name="cost_line_provider_day_idx")]

    def __str__(self) -> str:
        return f"{self.day} {self.model} {self.amount}"


class Reconciliation(models.Model):
    class Status(models.TextChoices):
        OK = "ok", "Within thresholds"
        DRIFT = "drift", "Drift over threshold"

    provider = models.ForeignKey("gateway.Provider", on_delete=models.PROTECT, related_name="+")
    month = models.DateField(help_text="First day of the month reconciled (UTC days).")
    billed = models.DecimalField(max_digits=18, decimal_places=8)
    ledger = models.DecimalField(max_digits=18, decimal_places=8)
    bypass = models.DecimalField(max_digits=18, decimal_places=8, default=Decimal("0"),
                                 help_text="Billed on lines with no ledger traffic.")
    explained = models.DecimalField(max_digits=18, decimal_places=8, default=Decimal("0"),
                                    help_text="Difference on lines whose cause the evidence shows.")
    unexplained = models.DecimalField(max_digits=18, decimal_places=8, default=Decimal("0"),
                                      help_text="What a true-up allocates.")
    status = models.CharField(max_length=8, choices=Status.choices)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.provider} {self.month:%Y-%m}: billed {self.billed}, ledger {self.ledger}"

    @property
    def drift(self) -> Decimal:
        return self.billed - self.ledger


class ReconciliationLine(models.Model):
    class Flag(models.TextChoices):
        OK = "ok", "Matches"
        DRIFT = "drift", "Drift"
        BYPASS = "bypass", "Billed with no ledger traffic: possible bypass of the gateway"
        UNBILLED = "unbilled", "Ledger traffic the provider did not bill"

    reconciliation = models.ForeignKey(Reconciliation, on_delete=models.CASCADE, related_name="lines")
    day = models.DateField()
    model = models.CharField(max_length=120, help_text="The catalog model, or the billed name no catalog model matches.")
    billed_as = models.CharField(max_length=300, blank=True, help_text="The names on the bill.")
    billed = models.DecimalField(max_digits=18, decimal_places=8)
    ledger = models.DecimalField(max_digits=18, decimal_places=8)
    billed_tokens = models.BigIntegerField(null=True, blank=True, help_text="From the provider's usage file, if imported.")
    ledger_tokens = models.BigIntegerField(default=0)
    flag = models.CharField(max_length=8, choices=Flag.choices)
    explanation = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ["day", "model"]

    @property
    def drift(self) -> Decimal:
        return self.billed - self.ledger

    @property
    def drift_percent(self) -> Decimal | None:
        return (self.drift / self.ledger * 100).quantize(Decimal("0.1")) if self.ledger else None


class TrueUp(models.Model):
    """The unexplained difference of a provider's month, allocated to teams as adjustment entries. Once per
    provider and month (the constraint); reversing it writes the counter-entries and frees the month."""

    provider = models.ForeignKey("gateway.Provider", on_delete=models.PROTECT, related_name="+")
    month = models.DateField()
    reconciliation = models.ForeignKey(Reconciliation, on_delete=models.PROTECT, related_name="true_ups")
    amount = models.DecimalField(max_digits=18, decimal_places=8)
    entries = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    reversed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    reversed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["provider", "month"], condition=models.Q(reversed_at__isnull=True),
                                               name="true_up_once_per_provider_month")]

    def __str__(self) -> str:
        return f"true-up #{self.pk} of {self.provider} {self.month:%Y-%m}: {self.amount}"

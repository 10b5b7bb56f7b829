"""Grants: a budget is an authorization with an owner, a scope, a class, a limit and a renewal date.
Grants nest (org -> department -> team -> project/feature -> person/key); a call is charged to every grant
that covers it and to each of their ancestors."""
import logging
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Sum
from django.utils import timezone

from governance.models import UsageClass

log = logging.getLogger(__name__)


def default_thresholds() -> list[int]:
    return [50, 80, 100]


class GrantQuerySet(models.QuerySet):
    def manageable_by(self, person) -> "GrantQuerySet":
        """Who may change which grants (delegate, renew, and the admin): IT (change permission) all; everyone
        else the grants they own. Finance and auditors see grants and change none."""
        if person.has_perm("budgets.change_grant"):
            return self
        return self.filter(owner=person)


class Grant(models.Model):
    objects = GrantQuerySet.as_manager()

    class Scope(models.TextChoices):
        ORG = "org", "Organisation"
        DEPARTMENT = "department", "Department"
        TEAM = "team", "Team"
        PROJECT = "project", "Project / feature"
        ENVIRONMENT = "environment", "Environment"
        PERSON = "person", "Person"
        KEY = "key", "Key"

    GrantClass = UsageClass

    class Period(models.TextChoices):
        MONTHLY = "monthly", "Monthly"
        WEEKLY = "weekly", "Weekly"
        DAILY = "daily", "Daily"
        TOTAL = "total", "One-off total"

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        SUSPENDED = "suspended", "Suspended"
        EXPIRED = "expired", "Expired"

    class OnCap(models.TextChoices):
        BLOCK = "block", "Block further calls"
        ALLOW_AND_PAGE = "allow_and_page", "Allow, and page the owner and IT at once"
        DOWNGRADE = "downgrade", "Route premium models to the downgrade model, then block"

    class WhenUnverifiable(models.TextChoices):
        BY_CLASS = "", "By class (production admits, experimentation refuses)"
        OPEN = "open", "Admit the call and flag it"
        CLOSED = "closed", "Refuse the call (503)"

    name = models.CharField(max_length=120)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="owned_grants")
    watchers = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="watched_grants")
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="children")
    allow_oversubscription = models.BooleanField(
        default=False, help_text="Children may promise more in total than this grant's limit (each is still capped).")
    scope = models.CharField(max_length=16, choices=Scope.choices)
    department = models.ForeignKey("governance.Department", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    team = models.ForeignKey("governance.Team", null=True, blank=True, on_delete=models.PROTECT, related_name="grants")
    person = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    key = models.ForeignKey("keys.VirtualKey", null=True, blank=True, on_delete=models.PROTECT, related_name="grants")
    project = models.CharField(max_length=80, blank=True, help_text="Project or feature tag, for project scope.")
    environment = models.CharField(max_length=40, blank=True, help_text="Environment tag, for environment scope.")
    grant_class = models.CharField(max_length=16, choices=GrantClass.choices, default=GrantClass.EXPERIMENTATION)
    period = models.CharField(max_length=8, choices=Period.choices, default=Period.MONTHLY)
    limit_amount = models.DecimalField(max_digits=14, decimal_places=2)
    limit_tokens = models.BigIntegerField(null=True, blank=True)
    allowed_models = models.ManyToManyField("gateway.ModelAlias", blank=True, related_name="+",
                                            help_text="Empty: no restriction from this grant.")
    on_cap = models.CharField(max_length=16, choices=OnCap.choices, default=OnCap.BLOCK,
                              help_text="Production grants only; experimentation grants always block.")
    downgrade_to = models.ForeignKey("gateway.ModelAlias", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    when_unverifiable = models.CharField(max_length=8, choices=WhenUnverifiable.choices, default="", blank=True)
    alert_thresholds = models.JSONField(default=default_thresholds, blank=True, help_text="Percent of the limit, e.g. [50, 80, 100].")
    webhook_url = models.URLField(blank=True, help_text="Slack-compatible incoming webhook for alerts.")
    term_start = models.DateField(default=timezone.localdate)
    renews_at = models.DateField(null=True, blank=True, help_text="The grant expires after this date unless renewed.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE, db_index=True)
    purpose = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        indexes = [
            models.Index(fields=["scope", "status"], name="grant_scope_status_idx"),
            models.Index(fields=["renews_at"], name="grant_renews_idx"),
        ]

    PERIOD_PHRASES = {"monthly": "per month", "weekly": "per week", "daily": "per day", "total": "in total"}

    @property
    def period_phrase(self) -> str:
        """"per month", "per week", "per day" or "in total": how people say a limit's period."""
        return self.PERIOD_PHRASES.get(self.period, f"per {self.period}")

    def __str__(self) -> str:
        return f"{self.name} ({self.get_scope_display()}, {self.limit_amount})"

    @property
    def fails_open(self) -> bool:
        if self.when_unverifiable:
            return self.when_unverifiable == self.WhenUnverifiable.OPEN
        return self.grant_class == UsageClass.PRODUCTION

    def ancestors(self) -> list["Grant"]:
        chain, node, seen = [], self.parent, {self.pk}
        while node is not None and node.pk not in seen:
            chain.append(node)
            seen.add(node.pk)
            node = node.parent
        return chain

    def clean(self) -> None:
        required = {self.Scope.DEPARTMENT: "department", self.Scope.TEAM: "team", self.Scope.PERSON: "person",
                    self.Scope.KEY: "key", self.Scope.PROJECT: "project", self.Scope.ENVIRONMENT: "environment"}
        field = required.get(self.scope)
        if field and not getattr(self, field if field in ("project", "environment") else f"{field}_id"):
            raise ValidationError({field: f"A {self.get_scope_display().lower()} grant needs a {field}."})
        if self.parent_id and self.parent_id == self.pk:
            raise ValidationError({"parent": "A grant cannot be its own parent."})
        if self.parent_id and self.pk and any(a.pk == self.pk for a in self.parent.ancestors()):
            raise ValidationError({"parent": "That parent is one of this grant's own descendants."})
        if self.on_cap == self.OnCap.DOWNGRADE and not self.downgrade_to_id:
            raise ValidationError({"downgrade_to": "Name the model to downgrade to."})
        if self.parent_id and not self.parent.allow_oversubscription:
            siblings = self.parent.children.exclude(pk=self.pk).exclude(status=self.Status.EXPIRED)
            promised = (siblings.aggregate(s=Sum("limit_amount"))["s"] or Decimal(0)) + (self.limit_amount or 0)
            if promised > self.parent.limit_amount:
                raise ValidationError({"limit_amount": (
                    f"The children of '{self.parent.name}' would promise {promised}, more than its limit of "
                    f"{self.parent.limit_amount}; lower this limit or let the parent oversubscribe.")})


class GrantAlert(models.Model):
    """One alert raised: the unique constraint makes each threshold go out once per period, whoever races.
    A pending alert was raised but not sent yet (it could not be queued, or its sending failed);
    budgets.alerts.deliver_pending sends it."""

    grant = models.ForeignKey(Grant, on_delete=models.CASCADE, related_name="alerts")
    period_start = models.DateTimeField()
    kind = models.CharField(max_length=16, help_text="A threshold percent ('80'), 'forecast' or 'page'.")
    spent = models.DecimalField(max_digits=14, decimal_places=2)
    sent_at = models.DateTimeField(auto_now_add=True, help_text="When it was sent; for a pending alert, when it was raised.")
    pending = models.BooleanField(default=False, help_text="Raised but not sent yet.")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["grant", "period_start", "kind"], name="grant_alert_once_per_period")]
        indexes = [models.Index(fields=["sent_at"], condition=models.Q(pending=True), name="grant_alert_pending_idx")]
        ordering = ["-sent_at"]

    def __str__(self) -> str:
        return f"{self.grant.name}: {self.kind} at {self.spent}"


class IncreaseRequest(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        APPROVED = "approved", "Approved"
        DENIED = "denied", "Denied"

    grant = models.ForeignKey(Grant, on_delete=models.CASCADE, related_name="increase_requests")
    requester = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    new_limit = models.DecimalField(max_digits=14, decimal_places=2)
    from_limit = models.DecimalField(max_digits=14, decimal_places=2, null=True, blank=True,
                                     help_text="The grant's limit when the increase was asked for.")
    reason = models.CharField(max_length=300)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    approver = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                                 help_text="Who must decide: the parent grant's owner (or IT for a top-level grant).")
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_reason = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.grant.name} -> {self.new_limit} ({self.status})"


class Alert(models.Model):
    """An anomaly seen in the ledger (budgets.anomalies): a runaway rate or spend, a very expensive call, a switch
    to premium models or a new source network, with the numbers that made it fire. `subject` names what it is
    about ("key:12", "person:3", "team:5"); the foreign keys hold that subject and, for a key, its holder and team
    (so owners find it). One alert per kind and subject until it is resolved: the partial unique constraint is on
    `subject`, not on the nullable foreign keys, where NULLs would never collide."""

    class Kind(models.TextChoices):
        RATE = "rate", "Request rate"
        SPEND = "spend", "Spend"
        EXPENSIVE_CALL = "expensive_call", "Expensive call"
        PREMIUM_SWITCH = "premium_switch", "Switch to premium models"
        NEW_NETWORK = "new_network", "New source network"

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        ACKNOWLEDGED = "acknowledged", "Acknowledged"
        RESOLVED = "resolved", "Resolved"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    subject = models.CharField(max_length=40, help_text='What the alert is about: "key:<id>", "person:<id>" or "team:<id>".')
    key = models.ForeignKey("keys.VirtualKey", null=True, blank=True, on_delete=models.PROTECT, related_name="anomaly_alerts")
    person = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    team = models.ForeignKey("governance.Team", null=True, blank=True, on_delete=models.PROTECT, related_name="anomaly_alerts")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    evidence = models.JSONField(default=dict, blank=True, help_text="The numbers that made it fire.")
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)
    acknowledged_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    resolved_at = models.DateTimeField(null=True, blank=True)
    action_taken = models.CharField(max_length=300, blank=True, help_text="What was done about it: suspension, reinstatement.")

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "anomaly alert"
        constraints = [
            models.UniqueConstraint(fields=["kind", "subject"], condition=~models.Q(status="resolved"),
                                    name="anomaly_alert_once_until_resolved"),
        ]
        indexes = [models.Index(fields=["status", "created_at"], name="anomaly_alert_status_idx")]

    def __str__(self) -> str:
        return f"#{self.pk} {self.get_kind_display()} on {self.subject_label}"

    @property
    def subject_label(self) -> str:
        what, _, _ = self.subject.partition(":")
        if what == "key" and self.key_id:
            return f"key {self.key.prefix}… ({self.key.name})"
        if what == "person" and self.person_id:
            return f"person {self.person.get_username()}"
        if what == "team" and self.team_id:
            return f"team {self.team.slug}"
        return self.subject

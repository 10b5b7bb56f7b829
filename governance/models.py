"""The organisation (people, departments, cost centers, teams, memberships), the append-only audit trail, and
outgoing webhook endpoints with their delivery log."""
import uuid

from django.contrib.auth.models import AbstractUser
from django.db import models
from django.utils import timezone

from governance.validators import validate_cidr_list


class Department(models.Model):
    name = models.CharField(max_length=120, unique=True)
    slug = models.SlugField(max_length=60, unique=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class CostCenter(models.Model):
    code = models.CharField(max_length=32, unique=True, help_text="The code finance books spend against.")
    name = models.CharField(max_length=120)
    department = models.ForeignKey(Department, null=True, blank=True, on_delete=models.PROTECT, related_name="cost_centers")
    is_active = models.BooleanField(default=True)

    class Meta:
        ordering = ["code"]

    def __str__(self) -> str:
        return f"{self.code} {self.name}"


class RateLimits(models.Model):
    """Requests and tokens per minute and per day; empty means no limit at this level."""

    rpm_limit = models.PositiveIntegerField("requests per minute", null=True, blank=True)
    rpd_limit = models.PositiveIntegerField("requests per day", null=True, blank=True)
    tpm_limit = models.PositiveIntegerField("tokens per minute", null=True, blank=True)
    tpd_limit = models.PositiveIntegerField("tokens per day", null=True, blank=True)

    class Meta:
        abstract = True


class UsageClass(models.TextChoices):
    """What a key or grant is for; decides how caps behave (experimentation fails closed, production by policy)."""

    EXPERIMENTATION = "experimentation", "Experimentation"
    PRODUCTION = "production", "Production"


class BodyLogging(models.TextChoices):
    """Whether prompt and response bodies are kept with the ledger entry."""

    OFF = "off", "Off"
    REDACTED = "redacted", "Redacted (emails, phone and card numbers, secrets removed)"
    FULL = "full", "Full"


class Person(RateLimits, AbstractUser):
    """Anyone who holds, requests, approves or reviews keys. Logs in with a username."""

    email = models.EmailField(unique=True)
    department = models.ForeignKey(Department, null=True, blank=True, on_delete=models.SET_NULL, related_name="people")
    cost_center = models.ForeignKey(
        CostCenter, null=True, blank=True, on_delete=models.SET_NULL, related_name="people",
        help_text="Default cost center for this person's spend when a team does not say otherwise.",
    )

    class Meta:
        verbose_name = "person"
        verbose_name_plural = "people"
        ordering = ["username"]

    def __str__(self) -> str:
        return self.get_full_name() or self.username


class Team(RateLimits):
    name = models.CharField(max_length=120)
    slug = models.SlugField(max_length=60, unique=True)
    department = models.ForeignKey(Department, on_delete=models.PROTECT, related_name="teams")
    cost_center = models.ForeignKey(CostCenter, on_delete=models.PROTECT, related_name="teams")
    owner = models.ForeignKey(Person, on_delete=models.PROTECT, related_name="owned_teams")
    is_active = models.BooleanField(default=True)
    members = models.ManyToManyField(Person, through="Membership", related_name="teams")
    allowed_models = models.ManyToManyField(
        "gateway.ModelAlias", blank=True, related_name="+", help_text="Empty: every model in the catalog."
    )
    ip_allowlist = models.JSONField(default=list, blank=True, validators=[validate_cidr_list], help_text="CIDRs every key of the team must call from; empty: any.")
    body_logging = models.CharField(max_length=8, choices=BodyLogging.choices, default=BodyLogging.OFF)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    class Role(models.TextChoices):
        MEMBER = "member", "Member"
        OWNER = "owner", "Owner"
        APPROVER = "approver", "Approver"

    person = models.ForeignKey(Person, on_delete=models.CASCADE, related_name="memberships")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["person", "team"], name="membership_person_team_unique")]
        ordering = ["team", "person"]

    def __str__(self) -> str:
        return f"{self.person} in {self.team} ({self.role})"


class AuditEventQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise PermissionError("audit events are append-only")

    def delete(self):
        raise PermissionError("audit events are append-only")


class AuditEvent(models.Model):
    """One state change. Append-only (the database refuses UPDATE and DELETE), hash-chained:
    hash = SHA-256(previous hash + canonical event); `manage.py verify_audit` walks the chain."""

    created_at = models.DateTimeField(db_index=True)
    actor = models.ForeignKey(Person, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    actor_label = models.CharField(max_length=150, help_text="Who acted, as it read then (a username or 'system').")
    action = models.CharField(max_length=64, db_index=True)
    object_type = models.CharField(max_length=64, blank=True, db_index=True)
    object_id = models.CharField(max_length=64, blank=True)
    object_repr = models.CharField(max_length=200, blank=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["object_type", "object_id"], name="audit_object_idx")]

    def __str__(self) -> str:
        return f"#{self.pk} {self.action} {self.object_repr}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise PermissionError("audit events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise PermissionError("audit events are append-only")


class WebhookEndpoint(models.Model):
    """A receiver of outgoing webhooks (governance.webhooks). Its signing secret is encrypted at rest
    (governance.crypto), shown once when created or rotated, and never audited."""

    EVENTS = (
        ("access_request.created", "Access request created"),
        ("access_request.decided", "Access request decided"),
        ("key.issued", "Key issued"),
        ("key.rotated", "Key rotated"),
        ("key.revoked", "Key revoked"),
        ("key.expiring", "Key expiring (7 and 1 days ahead)"),
        ("budget.threshold_crossed", "Budget threshold crossed"),
        ("anomaly.raised", "Anomaly raised"),
        ("reconciliation.finished", "Reconciliation finished"),
    )
    AUDIT_EXCLUDE = ("secret_encrypted",)

    url = models.URLField(max_length=500, help_text="Receives a signed JSON POST for each event.")
    description = models.CharField(max_length=200, blank=True)
    events = models.JSONField(default=list, blank=True, help_text="Event names to send; empty: every event.")
    secret_encrypted = models.TextField(editable=False)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["url"]

    def __str__(self) -> str:
        return self.description or self.url

    @property
    def secret(self) -> str:
        from governance import crypto

        return crypto.decrypt(self.secret_encrypted)

    def set_secret(self, plaintext: str) -> None:
        from governance import crypto

        self.secret_encrypted = crypto.encrypt(plaintext)

    def wants(self, event: str) -> bool:
        return self.is_active and (not self.events or event in self.events)


class WebhookDelivery(models.Model):
    """One event for one endpoint, and how sending it went. Written only by governance.webhooks."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed"

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False, help_text="The body's id and X-Tollgate-Delivery.")
    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=64, db_index=True)
    payload = models.JSONField(help_text="The body's data: ids, prefixes, names, amounts and links; never a secret.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "webhook deliveries"
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.event} to {self.endpoint_id} ({self.status})"

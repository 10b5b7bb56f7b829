"""Virtual keys (what apps present to the relay; stored as SHA-256 plus a visible prefix, never in clear),
the access requests that lead to them, and the provisioning policy that decides which need a person."""
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.functional import cached_property

from governance import crypto
from governance.models import BodyLogging, Membership, RateLimits, UsageClass
from governance.validators import validate_cidr_list

DURATION_CHOICES = [(30, "30 days"), (60, "60 days"), (90, "90 days")]


class VirtualKeyQuerySet(models.QuerySet):
    def visible_to(self, person) -> "VirtualKeyQuerySet":
        """Who sees which keys: IT and auditors (view permission) see all; everyone else their own keys and
        the keys of teams they own or approve for."""
        if person.has_perm("keys.view_virtualkey"):
            return self
        return self._held_or_managed_by(person)

    def manageable_by(self, person) -> "VirtualKeyQuerySet":
        """Who may act on which keys (revoke, suspend, ask for changes): IT (change permission) on all;
        everyone else on their own keys and the keys of teams they own or approve for. Seeing a key is never
        enough: auditors and finance see every key and act on none."""
        if person.has_perm("keys.change_virtualkey"):
            return self
        return self._held_or_managed_by(person)

    def _held_or_managed_by(self, person) -> "VirtualKeyQuerySet":
        managed_teams = Membership.objects.filter(
            person=person, role__in=[Membership.Role.OWNER, Membership.Role.APPROVER]
        ).values("team_id")
        return self.filter(Q(person=person) | Q(team_id__in=managed_teams) | Q(team__owner=person))


class VirtualKey(RateLimits):
    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        ACTIVE = "active", "Active"
        SUSPENDED = "suspended", "Suspended"
        EXPIRED = "expired", "Expired"
        REVOKED = "revoked", "Revoked"

    KeyClass = UsageClass

    AUDIT_EXCLUDE = ("key_hash", "previous_key_hash", "signing_secret_encrypted")

    name = models.CharField(max_length=120)
    prefix = models.CharField(max_length=16, db_index=True, help_text="The first characters of the key, to recognise it.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    # After a rotation the old secret keeps working until previous_key_expires_at (the grace period).
    previous_key_hash = models.CharField(max_length=64, unique=True, null=True, blank=True, editable=False)
    previous_key_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    signing_secret_encrypted = models.TextField(
        blank=True, editable=False,
        help_text="Service keys: HMAC secret the app signs X-Tollgate-Actor with (encrypted at rest).",
    )
    person = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="virtual_keys",
        help_text="The person the key belongs to; empty for a team's service key.",
    )
    team = models.ForeignKey("governance.Team", on_delete=models.PROTECT, related_name="virtual_keys")
    key_class = models.CharField(max_length=16, choices=KeyClass.choices, default=KeyClass.EXPERIMENTATION)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE, db_index=True)
    allowed_models = models.ManyToManyField(
        "gateway.ModelAlias", blank=True, related_name="+", help_text="Empty: every model the team may use."
    )
    ip_allowlist = models.JSONField(default=list, blank=True, validators=[validate_cidr_list], help_text="CIDRs; empty: any address.")
    default_tags = models.JSONField(default=dict, blank=True, help_text="project, feature, environment, experiment.")
    body_logging = models.CharField(
        max_length=8, choices=[("", "As the team says"), *BodyLogging.choices], blank=True, default=""
    )
    monthly_budget = models.DecimalField(max_digits=12, decimal_places=2, null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    approved_by_policy = models.BooleanField(default=False, help_text="Provisioned by policy, without a person approving.")
    expiry_notice_days = models.PositiveSmallIntegerField(
        null=True, blank=True, editable=False, help_text="The last expiry notice sent (7 or 1 days ahead).",
    )

    objects = VirtualKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["team", "status"], name="key_team_status_idx"),
            # The admin's filters over a million keys (bench/keys_admin.md).
            models.Index(fields=["key_class", "-created_at"], name="key_class_created_idx"),
            models.Index(fields=["approved_by_policy", "-created_at"], name="key_policy_created_idx"),
            models.Index(fields=["status", "last_used_at"], name="key_status_last_used_idx"),
        ]
        constraints = [
            models.CheckConstraint(condition=~Q(prefix=""), name="key_prefix_not_empty"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def effective_body_logging(self) -> str:
        return self.body_logging or self.team.body_logging

    @property
    def is_service_key(self) -> bool:
        return self.person_id is None

    @cached_property  # the relay keeps keys in memory: decrypt once per loaded key, not on every call
    def signing_secret(self) -> str:
        return crypto.decrypt(self.signing_secret_encrypted) if self.signing_secret_encrypted else ""


class ProvisioningPolicy(models.Model):
    """Which access requests are provisioned at once and which wait for an approver. One row, edited in admin."""

    auto_approve_max_days = models.PositiveSmallIntegerField(default=90, help_text="Longer requests need an approver.")
    auto_approve_max_budget = models.DecimalField(
        max_digits=12, decimal_places=2, default=Decimal("100"), help_text="Larger monthly budgets need an approver.",
    )
    auto_approve_premium_models = models.BooleanField(default=False, help_text="Premium-tier models without an approver.")
    auto_approve_production = models.BooleanField(default=False, help_text="Production-class keys without an approver.")
    max_active_keys_per_person = models.PositiveSmallIntegerField(default=5)
    rotation_grace_hours = models.PositiveSmallIntegerField(default=24, help_text="How long a rotated-out secret keeps working.")

    class Meta:
        verbose_name_plural = "provisioning policy"

    def __str__(self) -> str:
        return "Provisioning policy"

    @classmethod
    def current(cls) -> "ProvisioningPolicy":
        policy, _ = cls.objects.get_or_create(pk=1)
        return policy

    def review_reasons(self, *, aliases, duration_days: int, monthly_budget, key_class: str) -> list[str]:
        """Why a request needs a person's approval; an empty list means policy approves it at once."""
        reasons = []
        premium = [a.name for a in aliases if a.tier == a.Tier.PREMIUM]
        if premium and not self.auto_approve_premium_models:
            reasons.append(f"premium models: {', '.join(premium)}")
        if duration_days > self.auto_approve_max_days:
            reasons.append(f"duration {duration_days} days is over {self.auto_approve_max_days}")
        if monthly_budget is not None and monthly_budget > self.auto_approve_max_budget:
            reasons.append(f"monthly budget {monthly_budget} is over {self.auto_approve_max_budget}")
        if key_class == UsageClass.PRODUCTION and not self.auto_approve_production:
            reasons.append("production keys need an approver")
        return reasons


class AccessRequestQuerySet(models.QuerySet):
    def decidable_by(self, person) -> "AccessRequestQuerySet":
        """Who may decide which requests: IT (change permission on requests) any team's, a team's owner and
        its owners and approvers their team's; nobody their own (separation of duties, IT included)."""
        mine = self.exclude(requester=person)
        if person.has_perm("keys.change_accessrequest"):
            return mine
        teams = Membership.objects.filter(
            person=person, role__in=[Membership.Role.OWNER, Membership.Role.APPROVER]).values("team_id")
        return mine.filter(Q(team_id__in=teams) | Q(team__owner=person))


class AccessRequest(models.Model):
    objects = AccessRequestQuerySet.as_manager()

    class Kind(models.TextChoices):
        NEW_KEY = "new_key", "New key"
        EXTENSION = "extension", "Extension"
        BUDGET = "budget", "More budget"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        APPROVED = "approved", "Approved"
        DENIED = "denied", "Denied"

    class Environment(models.TextChoices):
        DEVELOPMENT = "development", "Development"
        STAGING = "staging", "Staging"
        PRODUCTION = "production", "Production"

    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.NEW_KEY)
    requester = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="access_requests")
    team = models.ForeignKey("governance.Team", on_delete=models.PROTECT, related_name="access_requests")
    aliases = models.ManyToManyField("gateway.ModelAlias", blank=True, related_name="+", verbose_name="models")
    use_case = models.TextField(help_text="What the key is for, in business terms.")
    key_class = models.CharField(max_length=16, choices=UsageClass.choices, default=UsageClass.EXPERIMENTATION)
    environment = models.CharField(max_length=16, choices=Environment.choices, default=Environment.DEVELOPMENT)
    project = models.SlugField(max_length=64, blank=True, help_text="Project or feature tag for chargeback.")
    duration_days = models.PositiveSmallIntegerField(choices=DURATION_CHOICES, default=30)
    monthly_budget = models.DecimalField(max_digits=12, decimal_places=2, null=True, blank=True)
    key = models.ForeignKey(
        VirtualKey, null=True, blank=True, on_delete=models.PROTECT, related_name="requests",
        help_text="The key issued (new key) or concerned (extension, more budget).",
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    review_reasons = models.JSONField(default=list, blank=True)
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    decided_by_policy = models.BooleanField(default=False)
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_reason = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} for {self.requester} on {self.team} ({self.status})"


class AcceptableUsePolicy(models.Model):
    """One version of the acceptable-use policy. The version in force is the latest whose effective date has
    come; a person accepts it before their first key is issued (keys.services.policy)."""

    version = models.CharField(max_length=20, unique=True, help_text="E.g. 1, 2 or 2026-01.")
    text = models.TextField()
    effective_from = models.DateField(default=timezone.localdate, help_text="In force from this day on.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-effective_from", "-id"]
        verbose_name = "acceptable-use policy version"

    def __str__(self) -> str:
        return f"Acceptable-use policy v{self.version} (from {self.effective_from:%Y-%m-%d})"

    @classmethod
    def current(cls) -> "AcceptableUsePolicy | None":
        return cls.objects.filter(effective_from__lte=timezone.localdate()).order_by("-effective_from", "-id").first()


class PolicyAcceptance(models.Model):
    """A person accepted one version of the acceptable-use policy (written by keys.services.policy, audited)."""

    person = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="policy_acceptances")
    policy = models.ForeignKey(AcceptableUsePolicy, on_delete=models.PROTECT, related_name="acceptances")
    accepted_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-accepted_at"]
        constraints = [models.UniqueConstraint(fields=["person", "policy"], name="policy_acceptance_once")]

    def __str__(self) -> str:
        return f"{self.person} accepted v{self.policy.version} on {self.accepted_at:%Y-%m-%d}"


class ApiTokenQuerySet(models.QuerySet):
    def usable(self) -> "ApiTokenQuerySet":
        """Tokens that still authenticate: not revoked, not expired, held by an active person."""
        return self.filter(revoked_at__isnull=True, person__is_active=True).filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))


class ApiToken(models.Model):
    """A token for the management API (/api/v1/): `Authorization: Bearer tg_api_...`. Stored as SHA-256 plus a
    visible prefix, like virtual keys; the secret is shown once, when issued (governance.api.tokens). A token
    acts as its person, and its scopes narrow what that person may do: {"keys": "write", "usage": "read"}."""

    class Kind(models.TextChoices):
        PERSONAL = "personal", "Personal"
        SERVICE = "service", "Service (an automation account acting as itself)"

    AUDIT_EXCLUDE = ("token_hash",)

    name = models.CharField(max_length=120, help_text="What the token is for, e.g. 'Jira automation'.")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.PERSONAL)
    person = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="api_tokens",
        help_text="Whom the token acts as: a person, or the account of a service (a person without a login).",
    )
    prefix = models.CharField(max_length=16, db_index=True, editable=False)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    scopes = models.JSONField(
        default=dict, blank=True,
        help_text='Resource -> "read" or "write", e.g. {"keys": "write", "usage": "read"}; "*" for every resource.',
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+", editable=False,
    )

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API token"
        constraints = [models.CheckConstraint(condition=~Q(prefix=""), name="api_token_prefix_not_empty")]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def allows(self, resource: str, *, write: bool) -> bool:
        """Whether the scopes let the token read (or write) `resource`; write implies read."""
        level = self.scopes.get(resource, self.scopes.get("*")) if isinstance(self.scopes, dict) else None
        return level == "write" or (level == "read" and not write)

"""Providers (with encrypted API keys), the model catalog (aliases -> ordered deployments) and prices."""
import re
from decimal import Decimal

from django.db import models
from django.utils import timezone

from governance import crypto


class Provider(models.Model):
    class Kind(models.TextChoices):
        OPENAI = "openai", "OpenAI-compatible (OpenAI, vLLM, Ollama, any base URL)"
        AZURE_OPENAI = "azure_openai", "Azure OpenAI"
        ANTHROPIC = "anthropic", "Anthropic"
        MOCK = "mock", "Built-in mock (demo)"

    AUDIT_EXCLUDE = ("api_key_encrypted", "admin_key_encrypted")

    name = models.CharField(max_length=80, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    base_url = models.URLField(blank=True, help_text="e.g. https://api.openai.com/v1; empty for the mock.")
    api_version = models.CharField(max_length=32, blank=True, help_text="Azure OpenAI api-version.")
    api_key_encrypted = models.TextField(blank=True, editable=False)
    admin_key_encrypted = models.TextField(
        blank=True, editable=False, help_text="Optional admin key for the provider's cost API (monthly reconciliation).")
    connect_timeout = models.FloatField(default=5.0, help_text="Seconds.")
    read_timeout = models.FloatField(default=120.0, help_text="Seconds.")
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def api_key(self) -> str:
        return crypto.decrypt(self.api_key_encrypted) if self.api_key_encrypted else ""

    def set_api_key(self, plaintext: str) -> None:
        self.api_key_encrypted = crypto.encrypt(plaintext) if plaintext else ""

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key_encrypted)

    @property
    def admin_key(self) -> str:
        return crypto.decrypt(self.admin_key_encrypted) if self.admin_key_encrypted else ""

    def set_admin_key(self, plaintext: str) -> None:
        self.admin_key_encrypted = crypto.encrypt(plaintext) if plaintext else ""


class ProviderModel(models.Model):
    """A model as one provider serves it (for Azure, `name` is the deployment name)."""

    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="models")
    name = models.CharField(max_length=120, help_text="The provider's model id, e.g. gpt-4o-mini.")
    max_output_tokens = models.PositiveIntegerField(default=4096)
    context_window = models.PositiveIntegerField(default=128_000)

    class Meta:
        ordering = ["provider__name", "name"]
        constraints = [models.UniqueConstraint(fields=["provider", "name"], name="provider_model_unique")]

    def __str__(self) -> str:
        return f"{self.provider.name}/{self.name}"

    def price_at(self, when=None) -> "ModelPrice | None":
        when = when or timezone.now()
        return self.prices.filter(effective_from__lte=when).order_by("-effective_from").first()


class ModelPrice(models.Model):
    """Price per million tokens from `effective_from` on; past ledger entries keep the price in force then."""

    provider_model = models.ForeignKey(ProviderModel, on_delete=models.PROTECT, related_name="prices")
    effective_from = models.DateTimeField(default=timezone.now)
    input_per_mtok = models.DecimalField(max_digits=12, decimal_places=6)
    output_per_mtok = models.DecimalField(max_digits=12, decimal_places=6)
    cached_input_per_mtok = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))
    cache_write_per_mtok = models.DecimalField(
        max_digits=12, decimal_places=6, null=True, blank=True,
        help_text="Input tokens written to the provider's prompt cache (Anthropic: 1.25x input for 5-minute "
                  "writes, 2x for 1-hour). Empty: the input price.")

    class Meta:
        ordering = ["provider_model", "-effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["provider_model", "effective_from"], name="model_price_effective_unique")
        ]

    def __str__(self) -> str:
        return f"{self.provider_model} from {self.effective_from:%Y-%m-%d}"


class ModelAlias(models.Model):
    """What callers ask for (`fast`, `smart`, `gpt-4o-mini`): an ordered list of deployments to try."""

    class Tier(models.TextChoices):
        STANDARD = "standard", "Standard"
        PREMIUM = "premium", "Premium"

    class Kind(models.TextChoices):
        CHAT = "chat", "Chat"
        EMBEDDING = "embedding", "Embedding"

    name = models.CharField(max_length=80, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.CHAT)
    tier = models.CharField(max_length=16, choices=Tier.choices, default=Tier.STANDARD)
    description = models.CharField(max_length=200, blank=True)
    is_active = models.BooleanField(default=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "model aliases"

    def __str__(self) -> str:
        return self.name


class Deployment(models.Model):
    alias = models.ForeignKey(ModelAlias, on_delete=models.CASCADE, related_name="deployments")
    provider_model = models.ForeignKey(ProviderModel, on_delete=models.PROTECT, related_name="deployments")
    priority = models.PositiveSmallIntegerField(default=0, help_text="Lower is tried first; the next on 429/5xx/timeout.")

    class Meta:
        ordering = ["alias", "priority"]
        constraints = [models.UniqueConstraint(fields=["alias", "provider_model"], name="deployment_unique")]

    def __str__(self) -> str:
        return f"{self.alias} -> {self.provider_model} (#{self.priority})"


class BilledModelName(models.Model):
    """How a provider names a catalog model on its bills and cost exports. Reconciliation matches billed
    lines to catalog models only through this table (and a catalog model's own name, exactly): a billed
    name nothing here matches is its own line, flagged as spend that may not have gone through Tollgate."""

    OPENAI_SNAPSHOT = r"-\d{4}-\d{2}-\d{2}"
    ANTHROPIC_SNAPSHOT = r"-\d{8}"

    provider_model = models.ForeignKey(ProviderModel, on_delete=models.CASCADE, related_name="billed_names")
    name = models.CharField(max_length=120, help_text="The name on the bill, e.g. gpt-4o-mini or claude-sonnet-4.")
    snapshot_suffix = models.CharField(
        max_length=60, blank=True,
        help_text=r"A regular expression for the dated snapshots billed under this name, e.g. -\d{4}-\d{2}-\d{2} "
                  r"(OpenAI: gpt-4o-mini-2024-07-18) or -\d{8} (Anthropic: claude-sonnet-4-20250514). Empty: "
                  "the exact name only.")

    class Meta:
        ordering = ["provider_model", "name"]
        constraints = [models.UniqueConstraint(fields=["provider_model", "name"], name="billed_model_name_unique")]

    def __str__(self) -> str:
        return f"{self.name}{self.snapshot_suffix} -> {self.provider_model}"

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        self.name = self.name.strip().lower()
        try:
            re.compile(self.snapshot_suffix)
        except re.error as error:
            raise ValidationError({"snapshot_suffix": f"Not a regular expression: {error}."}) from None

    def matches(self, billed: str) -> bool:
        return billed == self.name or bool(self.snapshot_suffix) and re.fullmatch(
            re.escape(self.name) + f"(?:{self.snapshot_suffix})", billed) is not None

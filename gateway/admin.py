"""Providers and the model catalog. The provider API key is write-only: entered in a password field,
stored encrypted, never displayed."""
from django import forms
from django.contrib import admin

from gateway.models import BilledModelName, Deployment, ModelAlias, ModelPrice, Provider, ProviderModel
from governance.admin import AuditedModelAdmin
from governance.audit import audit_record


class ProviderForm(forms.ModelForm):
    base_url = forms.URLField(required=False, assume_scheme="https", help_text=Provider._meta.get_field("base_url").help_text)
    new_api_key = forms.CharField(
        label="API key", required=False, strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only. Leave empty to keep the stored key.",
    )

    new_admin_key = forms.CharField(
        label="Admin key (cost API)", required=False, strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Optional, write-only: lets the monthly reconciliation fetch costs from the provider.",
    )

    class Meta:
        model = Provider
        fields = ["name", "kind", "base_url", "api_version", "connect_timeout", "read_timeout", "is_active"]

    def save(self, commit=True):
        provider = super().save(commit=False)
        if self.cleaned_data.get("new_api_key"):
            provider.set_api_key(self.cleaned_data["new_api_key"])
        if self.cleaned_data.get("new_admin_key"):
            provider.set_admin_key(self.cleaned_data["new_admin_key"])
        if commit:
            provider.save()
        return provider


class ProviderModelInline(admin.TabularInline):
    model = ProviderModel
    extra = 0


@admin.register(Provider)
class ProviderAdmin(AuditedModelAdmin):
    form = ProviderForm
    list_display = ["name", "kind", "base_url", "key_set", "is_active"]
    list_filter = ["kind", "is_active"]
    search_fields = ["name", "base_url"]
    inlines = [ProviderModelInline]

    @admin.display(boolean=True, description="API key set")
    def key_set(self, obj: Provider) -> bool:
        return obj.has_api_key

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        for field, action in (("new_api_key", "provider.api_key_set"), ("new_admin_key", "provider.admin_key_set")):
            if form.cleaned_data.get(field):
                audit_record(actor=request.user, action=action, obj=obj)


class ModelPriceInline(admin.TabularInline):
    model = ModelPrice
    extra = 0


class BilledModelNameInline(admin.TabularInline):
    """How the provider's bills name this model: reconciliation matches billed lines only through these."""

    model = BilledModelName
    extra = 0


@admin.register(ProviderModel)
class ProviderModelAdmin(AuditedModelAdmin):
    list_display = ["name", "provider", "max_output_tokens", "context_window"]
    list_filter = ["provider"]
    list_select_related = ["provider"]
    search_fields = ["name", "provider__name"]
    inlines = [ModelPriceInline, BilledModelNameInline]


@admin.register(BilledModelName)
class BilledModelNameAdmin(AuditedModelAdmin):
    list_display = ["name", "snapshot_suffix", "provider_model"]
    list_filter = ["provider_model__provider"]
    list_select_related = ["provider_model__provider"]
    search_fields = ["name", "provider_model__name"]
    autocomplete_fields = ["provider_model"]


@admin.register(ModelPrice)
class ModelPriceAdmin(AuditedModelAdmin):
    list_display = ["provider_model", "effective_from", "input_per_mtok", "output_per_mtok", "cached_input_per_mtok",
                    "cache_write_per_mtok"]
    list_filter = ["provider_model__provider"]
    list_select_related = ["provider_model__provider"]
    search_fields = ["provider_model__name"]
    date_hierarchy = "effective_from"


class DeploymentInline(admin.TabularInline):
    model = Deployment
    extra = 0
    autocomplete_fields = ["provider_model"]


@admin.register(ModelAlias)
class ModelAliasAdmin(AuditedModelAdmin):
    list_display = ["name", "kind", "tier", "description", "is_active"]
    list_filter = ["kind", "tier", "is_active"]
    search_fields = ["name", "description"]
    inlines = [DeploymentInline]

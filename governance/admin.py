"""Admin for the organisation and the audit trail, and AuditedModelAdmin: every admin change writes an
AuditEvent in the same transaction as the change."""
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import HttpRequest

from governance.audit import audit_record, audited_save, snapshot
from governance.bigtables import LargeTableAdminMixin, recent_values_filter
from governance.models import AuditEvent, CostCenter, Department, Membership, Person, Team
from governance.people import person_deactivate


class AuditedModelAdmin(admin.ModelAdmin):
    """Admin saves and deletes are audited with before/after snapshots (secrets excluded by AUDIT_EXCLUDE)."""

    def _action_name(self, obj, verb: str) -> str:
        return f"{obj._meta.model_name}.{verb}"

    def save_model(self, request: HttpRequest, obj, form, change: bool) -> None:
        audited_save(obj, actor=request.user)  # the same validated, audited write as the management API's

    def save_related(self, request, form, formsets, change):
        # Many-to-many changes (e.g. allowed models) land after save_model; record them too.
        super().save_related(request, form, formsets, change)
        m2m = {
            f.name: sorted(str(pk) for pk in getattr(form.instance, f.name).values_list("pk", flat=True))
            for f in form.instance._meta.many_to_many
            if f.name in form.changed_data
        }
        if m2m:
            audit_record(actor=request.user, action=self._action_name(form.instance, "update_relations"), obj=form.instance, after=m2m)

    def delete_model(self, request: HttpRequest, obj) -> None:
        with transaction.atomic():
            before, pk = snapshot(obj), obj.pk
            super().delete_model(request, obj)
            obj.pk = pk
            audit_record(actor=request.user, action=self._action_name(obj, "delete"), obj=obj, before=before)

    def delete_queryset(self, request: HttpRequest, queryset) -> None:
        with transaction.atomic():
            for obj in queryset:
                self.delete_model(request, obj)


class ReadOnlyAdminMixin:
    """For records written only by services (audit trail, ledger, rollups, alerts): list and read, never edit."""

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    raw_id_fields = ["person"]


@admin.register(Person)
class PersonAdmin(UserAdmin):
    list_display = ["username", "email", "first_name", "last_name", "department", "is_staff", "is_active"]
    list_filter = ["is_staff", "is_active", "groups", "department"]
    list_select_related = ["department"]
    search_fields = ["username", "email", "first_name", "last_name"]
    fieldsets = UserAdmin.fieldsets + (("Organisation", {"fields": ["department", "cost_center"]}),)
    add_fieldsets = UserAdmin.add_fieldsets + (("Contact", {"fields": ["email"]}),)

    PRIVILEGED = ("is_superuser", "groups", "user_permissions")
    actions = ["deactivate_and_suspend_keys"]

    def get_readonly_fields(self, request, obj=None):
        """Roles and permissions are granted by superusers only: IT manages people, not its own powers."""
        readonly = list(super().get_readonly_fields(request, obj))
        return readonly if request.user.is_superuser else [*readonly, *self.PRIVILEGED]

    def has_change_permission(self, request, obj=None):
        """Only a superuser changes a superuser (their details, their password)."""
        if obj is not None and obj.is_superuser and not request.user.is_superuser:
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.is_superuser and not request.user.is_superuser:
            return False
        return super().has_delete_permission(request, obj)

    def save_model(self, request, obj, form, change):
        if not request.user.is_superuser and any(name in form.changed_data for name in self.PRIVILEGED):
            raise PermissionDenied("Only a superuser may change roles or permissions.")  # the form shows them read-only
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            after = {k: v for k, v in snapshot(obj).items() if k != "password"}
            audit_record(actor=request.user, action="person.update" if change else "person.create", obj=obj, after=after)
            if change and "is_active" in form.changed_data and not obj.is_active:
                person_deactivate(person=obj, actor=request.user, reason=f"deactivated in the admin by {request.user}")

    @admin.action(description="Deactivate and suspend keys", permissions=["change"])
    def deactivate_and_suspend_keys(self, request, queryset):
        done, suspended, skipped = 0, 0, []
        for person in queryset.order_by("pk"):
            if person == request.user or not self.has_change_permission(request, person):
                skipped.append(str(person))
                continue
            try:
                suspended += len(person_deactivate(person=person, actor=request.user,
                                                   reason=f"deactivated in the admin by {request.user}"))
            except PermissionDenied as exc:
                skipped.append(f"{person}: {exc}")
            else:
                done += 1
        if done:
            self.message_user(request, f"{done} deactivated, {suspended} keys suspended.", messages.SUCCESS)
        if skipped:
            self.message_user(request, f"Skipped (yourself, a superuser, or keys you may not suspend): "
                                       f"{'; '.join(skipped)}", messages.WARNING)


@admin.register(Department)
class DepartmentAdmin(AuditedModelAdmin):
    list_display = ["name", "slug"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}


@admin.register(CostCenter)
class CostCenterAdmin(AuditedModelAdmin):
    list_display = ["code", "name", "department", "is_active"]
    list_filter = ["is_active", "department"]
    list_select_related = ["department"]
    search_fields = ["code", "name"]


@admin.register(Team)
class TeamAdmin(AuditedModelAdmin):
    list_display = ["name", "slug", "department", "cost_center", "owner", "is_active"]
    list_filter = ["is_active", "department", "cost_center"]
    list_select_related = ["department", "cost_center", "owner"]
    search_fields = ["name", "slug", "owner__username", "owner__email"]
    raw_id_fields = ["owner"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(AuditedModelAdmin):
    list_display = ["person", "team", "role", "created_at"]
    list_filter = ["role", "team"]
    list_select_related = ["person", "team"]
    search_fields = ["person__username", "person__email", "team__name"]
    raw_id_fields = ["person", "team"]


@admin.register(AuditEvent)
class AuditEventAdmin(LargeTableAdminMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    """The trail is appended to by services, never edited. It grows without end: choices of the filters come
    from recent events and there is no date hierarchy (both would be a SELECT DISTINCT over every event)."""

    list_display = ["id", "created_at", "actor_label", "action", "object_type", "object_repr", "source_ip", "request_id"]
    list_filter = [recent_values_filter("action"), recent_values_filter("object_type", "object type"),
                   ("created_at", admin.DateFieldListFilter)]
    search_fields = ["actor_label", "object_repr", "object_id", "request_id", "action"]
    changelist_defer = ("before", "after")


# --- Login lockouts (django-axes): IT sees them and unlocks, and both are audited ------------------------------
from axes.admin import AccessAttemptAdmin as _AxesAttemptAdmin  # noqa: E402
from axes.models import AccessAttempt  # noqa: E402

admin.site.unregister(AccessAttempt)


@admin.register(AccessAttempt)
class AccessAttemptAdmin(_AxesAttemptAdmin):
    """Failed logins counting towards a lockout. Deleting one (or the unlock action) lifts its lockout."""

    actions = ["unlock"]

    @admin.action(description="Unlock (forget these failed logins)", permissions=["delete"])
    def unlock(self, request, queryset):
        self.delete_queryset(request, queryset)
        self.message_user(request, "Unlocked.")

    def delete_queryset(self, request, queryset):
        with transaction.atomic():
            for attempt in queryset:
                audit_record(actor=request.user, action="login.unlock",
                             after={"username": attempt.username, "ip_address": attempt.ip_address})
            queryset.delete()

    def delete_model(self, request, obj):
        self.delete_queryset(request, AccessAttempt.objects.filter(pk=obj.pk))


# --- Outgoing webhooks: endpoints (secret shown once) and the delivery log with replay -----------------------
from django import forms  # noqa: E402

from governance import webhooks  # noqa: E402
from governance.models import WebhookDelivery, WebhookEndpoint  # noqa: E402


class WebhookEndpointForm(forms.ModelForm):
    url = forms.URLField(max_length=500, assume_scheme="https", help_text=WebhookEndpoint._meta.get_field("url").help_text)
    events = forms.MultipleChoiceField(choices=WebhookEndpoint.EVENTS, required=False, widget=forms.CheckboxSelectMultiple,
                                       help_text="None ticked: every event, including ones added later.")

    class Meta:
        model = WebhookEndpoint
        fields = ["url", "description", "events", "is_active"]


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(AuditedModelAdmin):
    """The signing secret is made here and shown once (a message after saving); "Rotate secret" makes a new
    one, shown once too. The admin never displays a stored secret."""

    form = WebhookEndpointForm
    list_display = ["url", "description", "subscribed", "is_active", "created_at"]
    list_filter = ["is_active"]
    search_fields = ["url", "description"]
    actions = ["rotate_secret"]

    @admin.display(description="events")
    def subscribed(self, endpoint: WebhookEndpoint) -> str:
        return ", ".join(endpoint.events) if endpoint.events else "all"

    def save_model(self, request, obj, form, change):
        secret = None if change else webhooks.secret_new()
        if secret:
            obj.set_secret(secret)
        super().save_model(request, obj, form, change)
        if secret:
            self.message_user(request, f"Signing secret for {obj.url} (shown this once; copy it now): {secret}",
                              messages.WARNING)

    @admin.action(description="Rotate secret (the new one is shown once)", permissions=["change"])
    def rotate_secret(self, request, queryset):
        for endpoint in queryset:
            secret = webhooks.webhook_secret_rotate(endpoint=endpoint, actor=request.user)
            self.message_user(request, f"New signing secret for {endpoint.url} (shown this once; the old one no "
                                       f"longer signs): {secret}", messages.WARNING)


class WebhookEventFilter(admin.SimpleListFilter):
    """The known events (no SELECT DISTINCT over the log)."""

    title, parameter_name = "event", "event"

    def lookups(self, request, model_admin):
        return WebhookEndpoint.EVENTS

    def queryset(self, request, queryset):
        return queryset.filter(event=self.value()) if self.value() else queryset


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(LargeTableAdminMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    """Written by governance.webhooks only. Replay sends the selected deliveries again (same id), audited."""

    list_display = ["id", "created_at", "event", "endpoint", "status", "attempts", "last_status_code", "delivered_at"]
    list_filter = ["status", WebhookEventFilter, "endpoint"]
    list_select_related = ["endpoint"]
    search_fields = ["=uuid", "event"]
    changelist_defer = ("payload",)
    actions = ["replay"]

    def has_replay_permission(self, request) -> bool:
        return request.user.has_perm("governance.change_webhookdelivery")

    @admin.action(description="Replay (send again as new attempts)", permissions=["replay"])
    def replay(self, request, queryset):
        count = webhooks.webhook_replay(deliveries=queryset, actor=request.user)
        self.message_user(request, f"{count} deliver{'y' if count == 1 else 'ies'} queued again.", messages.SUCCESS)

"""Admin for the organisation and the audit trail, and AuditedModelAdmin: every admin change writes an
AuditEvent in the same transaction as the change."""
from django.contrib import admin
from django.contrib.auth.admin import UserAdmin
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import HttpRequest

from governance.audit import audit_record, snapshot
from governance.bigtables import LargeTableAdminMixin, recent_values_filter
from governance.models import AuditEvent, CostCenter, Department, Membership, Person, Team


class AuditedModelAdmin(admin.ModelAdmin):
    """Admin saves and deletes are audited with before/after snapshots (secrets excluded by AUDIT_EXCLUDE)."""

    def _action_name(self, obj, verb: str) -> str:
        return f"{obj._meta.model_name}.{verb}"

    def save_model(self, request: HttpRequest, obj, form, change: bool) -> None:
        with transaction.atomic():
            before = snapshot(type(obj).objects.get(pk=obj.pk)) if change else None
            super().save_model(request, obj, form, change)
            audit_record(
                actor=request.user, action=self._action_name(obj, "update" if change else "create"),
                obj=obj, before=before, after=snapshot(obj),
            )

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

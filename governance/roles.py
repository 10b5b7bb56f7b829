"""The organisation-wide roles, as Django groups. `sync_roles` is the one definition; migrations call it
whenever a new model brings new permissions."""

IT_ADMIN = "IT admin"
FINANCE = "Finance"
SECURITY_AUDITOR = "Security auditor"

# app label -> actions; "*" means add, change, delete and view.
ROLE_PERMISSIONS: dict[str, dict[str, tuple[str, ...]]] = {
    IT_ADMIN: {
        "keys": ("*",),
        "gateway": ("*",),
        "budgets": ("*",),
        "governance": ("*",),
        "ledger": ("view",),
        "axes": ("view", "delete"),  # login lockouts: see them, lift them
    },
    FINANCE: {
        "ledger": ("view", "add"),
        "budgets": ("view",),  # changing a grant is its owner's or IT's: finance reads and reports
        "governance": ("view",),
        "gateway": ("view",),
        "keys": ("view",),
    },
    SECURITY_AUDITOR: {
        "axes": ("view",),
        "keys": ("view",),
        "gateway": ("view",),
        "budgets": ("view",),
        "governance": ("view",),
        "ledger": ("view",),
    },
}
ALL_ACTIONS = ("add", "change", "delete", "view")
# Nobody edits or deletes the audit trail, whatever the role says.
NEVER_GRANTED = {"governance.change_auditevent", "governance.delete_auditevent", "governance.add_auditevent"}
# Prompts and responses are for IT and security reviews, not for chargeback.
# Webhook receivers' URLs can carry their own tokens (Slack's do): IT's and auditors', not finance's.
ROLE_DENY = {FINANCE: {"ledger.view_callbody", "ledger.add_callbody", "ledger.change_callbody", "ledger.delete_callbody",
                       "governance.view_webhookendpoint", "governance.view_webhookdelivery"}}


def sync_roles(apps, schema_editor=None) -> None:
    """Create the role groups and set exactly the permissions ROLE_PERMISSIONS gives them."""
    from django.contrib.auth.management import create_permissions

    for app_config in apps.get_app_configs():
        # Permissions are normally created after migrate; the groups need them now.
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None

    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for role, grants in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=role)
        wanted = []
        for app_label, actions in grants.items():
            actions = ALL_ACTIONS if actions == ("*",) else actions
            for perm in Permission.objects.filter(content_type__app_label=app_label).select_related("content_type"):
                action = perm.codename.split("_", 1)[0]
                label = f"{app_label}.{perm.codename}"
                if action in actions and label not in NEVER_GRANTED and label not in ROLE_DENY.get(role, ()):
                    wanted.append(perm)
        group.permissions.set(wanted)


def people_with_role(role: str):
    """Active members of a role group (none if the group is missing)."""
    from django.contrib.auth import get_user_model

    return list(get_user_model().objects.filter(groups__name=role, is_active=True))

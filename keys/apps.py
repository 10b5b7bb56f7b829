from django.apps import AppConfig
from django.db.models.signals import m2m_changed, post_delete, post_save


class KeysConfig(AppConfig):
    name = "keys"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from governance.models import CostCenter, Membership, Person, Team
        from keys.models import VirtualKey
        from keys.selectors import keys_changed

        # Cache invalidation only (no business rule): the relay keeps keys with their team, owner, cost
        # center and allowlists in memory (keys.selectors._KeyCache), and service keys' actors with their memberships; any write to them must reach every
        # process. Bulk .update() calls on these models bypass signals and call keys_changed() themselves.
        # Saves of fields the relay never reads do not reach it: a login saves Person.last_login, and
        # flushing every process's key cache on every login cost each process a reload of all its keys.
        unread = {"last_login", "password"}

        def changed(update_fields=None, **kwargs):
            if update_fields is not None and set(update_fields) <= unread:
                return
            keys_changed()

        for model in (VirtualKey, Team, Person, CostCenter, Membership):
            post_save.connect(changed, sender=model, weak=False, dispatch_uid=f"key-cache-save-{model.__name__}")
            post_delete.connect(changed, sender=model, weak=False, dispatch_uid=f"key-cache-delete-{model.__name__}")
        for through in (VirtualKey.allowed_models.through, Team.allowed_models.through):
            m2m_changed.connect(changed, sender=through, weak=False, dispatch_uid=f"key-cache-m2m-{through.__name__}")

from django.apps import AppConfig
from django.db.models.signals import m2m_changed


class BudgetsConfig(AppConfig):
    name = "budgets"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from budgets.models import Grant, grants_changed

        # Cache invalidation only (no business rule): a changed model allowlist must reach every process.
        m2m_changed.connect(lambda **kwargs: grants_changed(), sender=Grant.allowed_models.through, weak=False,
                            dispatch_uid="grants-allowlist-changed")

from django.apps import AppConfig


class GovernanceConfig(AppConfig):
    name = "governance"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from governance import runtime, signals  # noqa: F401 (receivers connect on import)

        runtime.watch()  # what the relay keeps in memory learns of every change (governance.runtime)

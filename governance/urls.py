"""Top-level URLs: admin, login, health, and each app's pages."""
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import TemplateView

from governance import health

admin.site.site_header = "Tollgate administration"
admin.site.site_title = "Tollgate"
admin.site.index_title = "Keys, budgets, ledger and providers"

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("oidc/", include("mozilla_django_oidc.urls")),
    path("admin/", admin.site.urls),
    path("keys/", include("keys.urls")),
    path("budgets/", include("budgets.urls")),
    path("ledger/", include("ledger.urls")),
    path("api/", include("governance.api.urls")),
    path("", include("gateway.urls")),
    path("", TemplateView.as_view(template_name="home.html"), name="home"),
]

handler403 = "governance.console.permission_denied"
handler404 = "governance.console.page_not_found"
handler500 = "governance.console.server_error"

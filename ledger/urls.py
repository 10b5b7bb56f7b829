from django.urls import path

from ledger import dashboard_views, views

app_name = "ledger"
urlpatterns = [
    path("chargeback/", views.chargeback, name="chargeback"),
    path("reconciliation/", views.reconciliations, name="reconciliations"),
    path("reconciliation/<int:pk>/", views.reconciliation_detail, name="reconciliation"),
    path("reconciliation/<int:pk>/true-up/", views.true_up, name="true_up"),
    path("true-up/<int:pk>/reverse/", views.true_up_reverse, name="true_up_reverse"),
    path("cost-import/<int:pk>/", views.cost_import, name="cost_import"),
    # Usage dashboard, scoped by role; each table as CSV with ?table=<section>&format=csv.
    path("usage/", dashboard_views.usage, name="usage"),
]

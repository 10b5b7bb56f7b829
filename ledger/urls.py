from django.urls import path

from ledger import views

app_name = "ledger"
urlpatterns = [
    path("chargeback/", views.chargeback, name="chargeback"),
    path("reconciliation/", views.reconciliations, name="reconciliations"),
    path("reconciliation/<int:pk>/", views.reconciliation_detail, name="reconciliation"),
]

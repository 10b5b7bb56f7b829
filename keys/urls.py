from django.urls import path

from keys import views

app_name = "keys"
urlpatterns = [
    path("", views.my_keys, name="my-keys"),
    path("request/", views.request_access, name="request"),
    path("getting-started/", views.getting_started, name="getting-started"),
    path("acceptable-use/", views.acceptable_use, name="acceptable-use"),
    path("<int:pk>/", views.key_detail, name="key-detail"),
    path("<int:pk>/rotate/", views.key_rotate, name="key-rotate"),
    path("<int:pk>/revoke/", views.key_revoke, name="key-revoke"),
    path("<int:pk>/change/", views.key_change_request, name="key-change"),
    path("requests/<int:pk>/collect/", views.request_collect, name="request-collect"),
    path("approvals/", views.approvals, name="approvals"),
    path("approvals/<int:pk>/", views.request_decide, name="request-decide"),
]

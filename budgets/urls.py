from django.urls import path

from budgets import views

app_name = "budgets"
urlpatterns = [
    path("", views.my_grants, name="my-grants"),
    path("<int:pk>/delegate/", views.delegate, name="delegate"),
    path("<int:pk>/increase/", views.increase, name="increase"),
    path("<int:pk>/renew/", views.renew, name="renew"),
    path("increases/<int:pk>/", views.decide_increase, name="decide-increase"),
]

from django.urls import path, re_path

from gateway import api, key_info

urlpatterns = [
    path("v1/chat/completions", api.ChatCompletionsView.as_view(), name="relay-chat"),
    path("v1/messages", api.MessagesView.as_view(), name="relay-messages"),
    path("v1/embeddings", api.EmbeddingsView.as_view(), name="relay-embeddings"),
    path("v1/models", api.ModelsView.as_view(), name="relay-models"),
    path("v1/key", key_info.key_info, name="relay-key"),
    re_path(r"^v1/(?P<rest>.*)$", api.not_found),
]

"""Gives every request an id (taken from X-Request-ID when it is sane, else new) for logs, audit and ledger."""
import re
import uuid

from governance.context import client_ip, request_id_var, source_ip_var

_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{8,64}$")


class RequestIdMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        incoming = request.headers.get("X-Request-ID", "")
        request.request_id = incoming if _SANE_ID.match(incoming) else uuid.uuid4().hex
        id_token = request_id_var.set(request.request_id)
        ip_token = source_ip_var.set(client_ip(request.META))
        try:
            response = self.get_response(request)
        finally:
            request_id_var.reset(id_token)
            source_ip_var.reset(ip_token)
        response["X-Request-ID"] = request.request_id
        return response

"""The services' refusals as JSON: a rule broken (ValidationError, RequestRefused, KeyStateError,
PolicyNotAccepted, ValueError from a report) is 400, a permission refused (PermissionDenied) is 403."""
from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions
from rest_framework.views import exception_handler as drf_exception_handler

from keys.services import KeyStateError, PolicyNotAccepted, RequestRefused


def _as_drf(exc):
    if isinstance(exc, DjangoValidationError):
        return exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else {"detail": exc.messages})
    if isinstance(exc, RequestRefused):
        return exceptions.ValidationError({exc.field or "detail": [exc.message]})
    if isinstance(exc, KeyStateError | PolicyNotAccepted):
        return exceptions.ValidationError({"detail": [str(exc)]})
    if isinstance(exc, PermissionDenied):
        return exceptions.PermissionDenied(str(exc) or None)
    return exc


def exception_handler(exc, context):
    return drf_exception_handler(_as_drf(exc), context)

"""Absolute links for emails: the address people open Tollgate at (TOLLGATE_BASE_URL) plus a page's path."""
from django.conf import settings
from django.urls import reverse


def absolute_link(viewname: str, *args) -> str:
    return settings.TOLLGATE_BASE_URL + reverse(viewname, args=args)

"""The console every page shares: navigation by role (with the number of decisions waiting), the currency,
and friendly error pages, also when DEBUG is on (`make run`): Django's debug 404 lists every URL."""
import logging
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.shortcuts import render
from django.urls import NoReverseMatch, reverse

log = logging.getLogger("django.request")


@dataclass(frozen=True)
class NavItem:
    label: str
    url: str
    count: int = 0


# label, route name, who sees it (a permission, "staff", or None for every signed-in person)
NAV = [
    ("My keys", "keys:my-keys", None),
    ("Request access", "keys:request", None),
    ("Getting started", "keys:getting-started", None),
    ("Approvals", "keys:approvals", None),
    ("Budgets", "budgets:my-grants", None),
    ("Usage", "ledger:usage", None),
    ("Chargeback", "ledger:chargeback", "ledger.view_ledgerentry"),
    ("Reconciliation", "ledger:reconciliations", "ledger.view_ledgerentry"),
    ("Admin", "admin:index", "staff"),
]


def waiting_decisions(user) -> int:
    """Access requests and grant increases waiting for this person's decision."""
    from budgets.selectors import increases_awaiting
    from keys.models import AccessRequest

    requests = AccessRequest.objects.decidable_by(user).filter(status=AccessRequest.Status.PENDING).count()
    return requests + increases_awaiting(user).count()


def navigation(user, path: str) -> list[dict]:
    items = []
    for label, route, needs in NAV:
        if needs == "staff" and not user.is_staff or needs not in (None, "staff") and not user.has_perm(needs):
            continue
        try:
            url = reverse(route)
        except NoReverseMatch:  # a page this installation does not have
            continue
        count = waiting_decisions(user) if route == "keys:approvals" else 0
        active = path.startswith(url) if url != "/" else path == "/"
        items.append({"label": label, "url": url, "count": count, "active": active})
    return items


def console(request) -> dict:
    """Template context for every page (settings.TEMPLATES context_processors)."""
    context = {"currency": settings.TOLLGATE_CURRENCY}
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated and not request.path.startswith(("/admin/", "/v1/")):
        context["nav"] = navigation(user, request.path)
    return context


def page_not_found(request, exception=None):
    return render(request, "404.html", status=404)


def permission_denied(request, exception=None):
    reason = str(exception) if isinstance(exception, PermissionDenied) and str(exception) else ""
    return render(request, "403.html", {"reason": reason}, status=403)


def server_error(request):
    # No context processors that touch the database: the error may be the database.
    from django.http import HttpResponseServerError
    from django.template import loader

    return HttpResponseServerError(loader.get_template("500.html").render({"request_id": getattr(request, "request_id", "")}))


class FriendlyErrorsMiddleware:
    """With DEBUG on (`make run`), pages still answer 404 and 500 with the console's pages, not Django's
    debug pages (which list every URL, and the settings). TOLLGATE_DEBUG_PAGES=true brings those back for
    developers. Off DEBUG, Django's handlers (handler404/500 in governance.urls) already do this."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if self._applies(request) and response.status_code == 404 and b"DEBUG = True" in (getattr(response, "content", b"") or b""):
            return page_not_found(request)
        return response

    def process_exception(self, request, exception):
        if not self._applies(request) or isinstance(exception, (Http404, PermissionDenied)):
            return None
        log.error("Internal Server Error: %s", request.path, exc_info=exception, extra={"status_code": 500})
        return server_error(request)

    @staticmethod
    def _applies(request) -> bool:
        return settings.DEBUG and not settings.TOLLGATE_DEBUG_PAGES and not request.path.startswith("/v1/")

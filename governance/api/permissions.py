"""What a token's scopes allow. Who may see or change which object is decided by the models' own querysets
(visible_to, manageable_by, decidable_by) and by the services; scopes only narrow that for a token."""
from rest_framework import permissions

from keys.models import ApiToken


class TokenScope(permissions.BasePermission):
    """A view names its resource (`scope_resource`); reads need "read" or "write" on it, writes "write".
    A session (the browser) is not narrowed."""

    message = "The API token's scopes do not allow this."

    def has_permission(self, request, view) -> bool:
        if not isinstance(request.auth, ApiToken):
            return True
        resource = getattr(view, "scope_resource", None)
        return resource is not None and request.auth.allows(resource, write=request.method not in permissions.SAFE_METHODS)


class HasModelPerm(permissions.BasePermission):
    """The Django permission a view names in `required_perm` (finance and IT reads: governance.roles)."""

    def has_permission(self, request, view) -> bool:
        perm = getattr(view, "required_perm", None)
        return perm is None or request.user.has_perm(perm)


DEFAULT = [permissions.IsAuthenticated, TokenScope, HasModelPerm]

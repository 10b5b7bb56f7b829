"""The grants that cover a call: every grant in this process's memory (reloaded on the grants stamp), matched
by scope and linked to their ancestors, and the refusals a grant gives before anything is counted."""
import threading
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.utils import timezone

from budgets.models import Grant
from gateway.models import ModelAlias
from governance import runtime, stamps
from governance.models import Person


class BudgetRefused(Exception):
    def __init__(self, code: str, message: str, *, grant: Grant | None = None):
        super().__init__(message)
        self.code, self.message, self.grant = code, message, grant


_SPECIFICITY = [Grant.Scope.KEY, Grant.Scope.PERSON, Grant.Scope.PROJECT, Grant.Scope.ENVIRONMENT, Grant.Scope.TEAM,
                Grant.Scope.DEPARTMENT, Grant.Scope.ORG]


@dataclass
class _GrantIndex:
    """Every grant, in this process's memory, with parents linked and model allowlists, so a call resolves
    its grants without a query. Reloaded whenever the grants stamp (governance.stamps, bumped after each
    grant write commits) differs from the one it was built at, and after TOLLGATE_MEMORY_CACHE_SECONDS in
    any case (in case a bump could not be published)."""

    version: object = None
    built_at: float = 0.0
    grants: list[Grant] = field(default_factory=list)
    allowlists: dict[int, set[int]] = field(default_factory=dict)
    # Grants by what their scope matches on (_scope_key), so a call looks at the grants that could cover it,
    # not at every grant of the org: the per-call cost does not grow with the number of grants.
    by_scope: dict[tuple, list[Grant]] = field(default_factory=dict)
    position: dict[int, int] = field(default_factory=dict)  # grant id -> its place in `grants`


def _scope_key(grant: Grant) -> tuple:
    return {
        Grant.Scope.ORG: (Grant.Scope.ORG,),
        Grant.Scope.DEPARTMENT: (Grant.Scope.DEPARTMENT, grant.department_id),
        Grant.Scope.TEAM: (Grant.Scope.TEAM, grant.team_id),
        Grant.Scope.KEY: (Grant.Scope.KEY, grant.key_id),
        Grant.Scope.PERSON: (Grant.Scope.PERSON, grant.person_id),
        Grant.Scope.PROJECT: (Grant.Scope.PROJECT, grant.project),
        Grant.Scope.ENVIRONMENT: (Grant.Scope.ENVIRONMENT, grant.environment),
    }[grant.scope]


def _call_keys(*, key, person, team, tags: dict) -> list[tuple]:
    """The scope keys a call could be covered under (`_matches` then decides, e.g. a person's grant must be
    for the call's team or for no team)."""
    return [
        (Grant.Scope.ORG,), (Grant.Scope.DEPARTMENT, team.department_id), (Grant.Scope.TEAM, team.pk),
        (Grant.Scope.KEY, key.pk), (Grant.Scope.PERSON, person.pk if person is not None else None),
        (Grant.Scope.PROJECT, tags.get("project")), (Grant.Scope.ENVIRONMENT, tags.get("environment")),
    ]


_index = _GrantIndex()
_index_lock = threading.Lock()


def _forget() -> None:
    global _index
    _index = _GrantIndex()


runtime.keeps(runtime.GRANTS, _forget)


def _grant_index() -> _GrantIndex:
    global _index
    version = stamps.current(stamps.GRANTS)

    def fresh() -> bool:
        return _index.version == version and time.monotonic() - _index.built_at < settings.TOLLGATE_MEMORY_CACHE_SECONDS

    if fresh():
        return _index
    with _index_lock:
        if not fresh():
            grants = {g.pk: g for g in Grant.objects.all()}
            # Owners and downgrade targets are few and shared: one instance each, not one per grant (5,000
            # grants held a copy of their owner each, some 10 MB per process).
            owners = Person.objects.in_bulk({g.owner_id for g in grants.values()})
            aliases = ModelAlias.objects.in_bulk({g.downgrade_to_id for g in grants.values() if g.downgrade_to_id})
            for grant in grants.values():
                grant.owner = owners[grant.owner_id]
                if grant.downgrade_to_id:
                    grant.downgrade_to = aliases[grant.downgrade_to_id]
                if grant.parent_id in grants:
                    grant.parent = grants[grant.parent_id]
            allowlists: dict[int, set[int]] = {}
            for grant_id, alias_id in Grant.allowed_models.through.objects.values_list("grant_id", "modelalias_id"):
                allowlists.setdefault(grant_id, set()).add(alias_id)
            by_scope: dict[tuple, list[Grant]] = {}
            for grant in grants.values():
                by_scope.setdefault(_scope_key(grant), []).append(grant)
            _index = _GrantIndex(version, time.monotonic(), list(grants.values()), allowlists, by_scope,
                                 {pk: at for at, pk in enumerate(grants)})
    return _index


def _matches(grant: Grant, *, key, person, team, tags: dict) -> bool:
    same_team = grant.team_id is None or grant.team_id == team.pk
    return {
        Grant.Scope.ORG: True,
        Grant.Scope.DEPARTMENT: team.department_id is not None and grant.department_id == team.department_id,
        Grant.Scope.TEAM: grant.team_id == team.pk,
        Grant.Scope.KEY: grant.key_id == key.pk,
        Grant.Scope.PERSON: person is not None and grant.person_id == person.pk and same_team,
        Grant.Scope.PROJECT: bool(tags.get("project")) and grant.project == tags.get("project") and same_team,
        Grant.Scope.ENVIRONMENT: bool(tags.get("environment")) and grant.environment == tags.get("environment") and same_team,
    }[grant.scope]


def covering_grants(*, key, person, team, tags: dict) -> list[Grant]:
    """Every grant a call is charged to: those whose scope matches the call, then all their ancestors.
    Most specific first."""
    index = _grant_index()
    candidates = [g for scope in _call_keys(key=key, person=person, team=team, tags=tags) for g in index.by_scope.get(scope, ())]
    direct = [g for g in candidates if _matches(g, key=key, person=person, team=team, tags=tags)]
    seen, ordered = set(), []
    for grant in sorted(direct, key=lambda g: (_SPECIFICITY.index(g.scope), index.position[g.pk])):
        for node in [grant, *grant.ancestors()]:
            if node.pk not in seen:
                seen.add(node.pk)
                ordered.append(node)
    return ordered


def check_grants(grants: list[Grant], alias) -> None:
    """Expired or suspended grants refuse the call; so does a grant whose model allowlist excludes it."""
    today = timezone.localdate()
    for grant in grants:
        if grant.status == Grant.Status.EXPIRED or (grant.renews_at is not None and grant.renews_at < today):
            raise BudgetRefused("grant_expired", f"grant '{grant.name}' (owner {grant.owner}) expired on "
                                f"{grant.renews_at or 'its renewal date'} and was not renewed", grant=grant)
        if grant.status == Grant.Status.SUSPENDED:
            raise BudgetRefused("grant_suspended", f"grant '{grant.name}' (owner {grant.owner}) is suspended", grant=grant)
    allowlists = _grant_index().allowlists
    for grant in grants:
        if grant.pk in allowlists and alias.pk not in allowlists[grant.pk]:
            raise BudgetRefused("model_not_allowed", f"grant '{grant.name}' does not cover the model '{alias.name}'", grant=grant)

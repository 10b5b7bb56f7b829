"""What the relay keeps in each process's memory, and the one call that says it changed.

The relay answers a call from a per-process copy of rows that change rarely and are read on every call,
in three parts, each kept by the app that owns the rows:
- KEYS: keys with their team, owner, cost center and allowlists, and service keys' actors (keys.selectors);
- GRANTS: every grant, indexed by scope, with parents linked (budgets.enforcement.grants);
- CATALOG: providers, models, prices, aliases and deployments as routes (gateway.catalog).
Whatever changes one of them calls `changed(part)`: once the transaction commits, the part's stamp moves
(governance.stamps) and every process, this one included, reads that part again on its next call. Services
call it for their bulk UPDATEs; the signals wired here call it for every model save, delete and allowlist
change (the admin's forms, fixtures, the services' saves), but not for fields the relay never reads (a
login's `last_login`, a key's `last_used_at`), so a busy login page does not flush every relay process.
"""
from collections.abc import Callable

from django.db import transaction

from governance import stamps

KEYS, GRANTS, CATALOG = stamps.KEYS, stamps.GRANTS, stamps.CATALOG
PARTS = (KEYS, GRANTS, CATALOG)

# model label -> the part it belongs to, and the fields the relay does not read
WATCHED: dict[str, tuple[str, frozenset[str]]] = {
    "keys.VirtualKey": (KEYS, frozenset({"last_used_at"})),
    "governance.Team": (KEYS, frozenset()),
    "governance.Person": (KEYS, frozenset({"last_login", "password"})),
    "governance.CostCenter": (KEYS, frozenset()),
    "governance.Membership": (KEYS, frozenset()),
    "budgets.Grant": (GRANTS, frozenset()),
    "gateway.Provider": (CATALOG, frozenset()),
    "gateway.ProviderModel": (CATALOG, frozenset()),
    "gateway.ModelPrice": (CATALOG, frozenset()),
    "gateway.ModelAlias": (CATALOG, frozenset()),
    "gateway.Deployment": (CATALOG, frozenset()),
}
ALLOWLISTS = {"keys.VirtualKey": KEYS, "governance.Team": KEYS, "budgets.Grant": GRANTS}  # allowed_models

_droppers: dict[str, list[Callable[[], None]]] = {part: [] for part in PARTS}


def keeps(part: str, drop: Callable[[], None]) -> None:
    """Register how this process forgets its copy of `part` (called by the module that keeps it)."""
    _droppers[part].append(drop)


def changed(*parts: str) -> None:
    """`parts` changed in the current transaction (or just now, outside one): every process reads them again
    once it commits. A change that cannot be published is logged; inside `stamps.published_or_raise()` it
    raises instead (commands must not say "done" when running processes were not told)."""
    for part in parts:
        stamps.bump(part)
    transaction.on_commit(lambda: drop(*parts))


def drop(*parts: str) -> None:
    """This process forgets its copy of `parts` (all by default) at once."""
    for part in parts or PARTS:
        for dropper in _droppers[part]:
            dropper()


def watch() -> None:
    """Connect the model signals (GovernanceConfig.ready)."""
    from django.apps import apps
    from django.db.models.signals import m2m_changed, post_delete, post_save

    for label, (part, unread) in WATCHED.items():
        def saved(update_fields=None, part=part, unread=unread, **kwargs):
            if update_fields is None or not set(update_fields) <= unread:
                changed(part)

        model = apps.get_model(label)
        post_save.connect(saved, sender=model, weak=False, dispatch_uid=f"runtime-save-{label}")
        post_delete.connect(lambda part=part, **kwargs: changed(part), sender=model, weak=False,
                            dispatch_uid=f"runtime-delete-{label}")
    for label, part in ALLOWLISTS.items():
        m2m_changed.connect(lambda part=part, **kwargs: changed(part), sender=apps.get_model(label).allowed_models.through,
                            weak=False, dispatch_uid=f"runtime-allowlist-{label}")

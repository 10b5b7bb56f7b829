"""Access requests: submit (provisioned at once when policy allows), approve, deny."""
from dataclasses import dataclass
from decimal import Decimal

from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from governance.audit import audit_record
from governance.models import Membership, Person, Team
from governance.notify import email_after_commit
from governance.webhooks import access_request_payload, webhook_emit
from keys.models import AccessRequest, ProvisioningPolicy, VirtualKey
from keys.services.lifecycle import IssuedKey, key_extend, key_issue
from keys.services.links import absolute_link
from keys.services.policy import PolicyNotAccepted, aup_accept, aup_pending_for


class RequestRefused(Exception):
    """A request that cannot be made as asked; `field` names the form field at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field


@dataclass(frozen=True)
class Submitted:
    request: AccessRequest
    issued: IssuedKey | None  # set when policy provisioned the key at once


def approvers_of(team: Team, *, besides: Person | None = None) -> list[Person]:
    """Who decides the team's requests: its owner, owners and approvers. `besides`: the requester, who never
    decides their own request (AccessRequest.objects.decidable_by), so is neither listed nor told it waits."""
    people = {team.owner}
    people.update(m.person for m in team.memberships.filter(
        role__in=[Membership.Role.OWNER, Membership.Role.APPROVER]).select_related("person"))
    return sorted((p for p in people if p.is_active and p != besides), key=lambda p: p.get_username())


def _check_new_key(*, requester: Person, team: Team, aliases, project: str) -> None:
    if not Membership.objects.filter(person=requester, team=team).exists():
        raise RequestRefused("You can only request keys for teams you belong to.", "team")
    team_allowed = set(team.allowed_models.values_list("pk", flat=True))
    refused = [a.name for a in aliases if team_allowed and a.pk not in team_allowed]
    if refused:
        raise RequestRefused(f"Your team may not use: {', '.join(refused)}.", "aliases")
    live = VirtualKey.objects.filter(person=requester, status__in=[VirtualKey.Status.ACTIVE, VirtualKey.Status.SUSPENDED])
    duplicate = live.filter(team=team, default_tags__project=project).first() if project else \
        live.filter(team=team).exclude(default_tags__has_key="project").first()
    if duplicate:
        raise RequestRefused(
            f"You already have an active key for this team and project: '{duplicate.name}' ({duplicate.prefix}…). "
            "Use it, rotate it, or revoke it first.", "project")
    if AccessRequest.objects.filter(requester=requester, team=team, project=project, kind=AccessRequest.Kind.NEW_KEY,
                                    status=AccessRequest.Status.PENDING).exists():
        raise RequestRefused("A request for this team and project is already waiting for an approver.", "project")
    limit = ProvisioningPolicy.current().max_active_keys_per_person
    if live.count() >= limit:
        raise RequestRefused(f"You have {limit} active keys, the most policy allows. Revoke one you no longer use.")


def _issue_for(request: AccessRequest, *, actor: Person | None, by_policy: bool) -> IssuedKey:
    aliases = list(request.aliases.all())
    tags = {"environment": request.environment, **({"project": request.project} if request.project else {})}
    issued = key_issue(
        name=f"{request.project or request.team.slug} ({request.environment})", team=request.team,
        person=request.requester, actor=actor, actor_label=None if actor else "provisioning policy",
        key_class=request.key_class, days=request.duration_days, aliases=aliases, default_tags=tags,
        monthly_budget=request.monthly_budget, approved_by_policy=by_policy,
    )
    request.key = issued.key
    return issued


@transaction.atomic
def request_submit(*, requester: Person, team: Team, aliases, use_case: str, key_class: str, environment: str,
                   project: str, duration_days: int, monthly_budget: Decimal | None,
                   accept_policy: bool = False) -> Submitted:
    """`accept_policy`: the requester ticked acceptance of the acceptable-use policy in force (recorded here,
    in the same transaction); without it a requester who has not accepted that version is refused."""
    aliases = list(aliases)
    if not use_case.strip():
        raise RequestRefused("Say what the key is for.", "use_case")
    if not aliases:
        raise RequestRefused("Choose at least one model.", "aliases")
    _check_new_key(requester=requester, team=team, aliases=aliases, project=project)
    policy = aup_pending_for(requester)
    if policy is not None:
        if not accept_policy:
            raise RequestRefused(f"Accept the acceptable-use policy (version {policy.version}) to request a key.",
                                 "accept_policy")
        aup_accept(person=requester, policy=policy)
    request = AccessRequest.objects.create(
        requester=requester, team=team, use_case=use_case.strip(), key_class=key_class, environment=environment,
        project=project, duration_days=duration_days, monthly_budget=monthly_budget,
    )
    request.aliases.set(aliases)
    reasons = ProvisioningPolicy.current().review_reasons(
        aliases=aliases, duration_days=duration_days, monthly_budget=monthly_budget, key_class=key_class)
    after = {"team": team.slug, "models": sorted(a.name for a in aliases), "class": key_class,
             "days": duration_days, "budget": monthly_budget, "review_reasons": reasons}
    audit_record(actor=requester, action="access_request.submit", obj=request, after=after)
    webhook_emit("access_request.created", {**access_request_payload(request), "review_reasons": reasons})
    if reasons:
        request.review_reasons = reasons
        request.save(update_fields=["review_reasons"])
        deciders = approvers_of(team, besides=requester)
        email_after_commit(to=[requester], subject="Your access request is waiting for approval",
                           body=f"Your request for {team.name} needs an approver: {'; '.join(reasons)}.\n"
                                f"Who decides: {', '.join(str(p) for p in deciders) or 'IT'}.\n\n"
                                f"Your requests: {absolute_link('keys:my-keys')}")
        email_after_commit(to=deciders, subject=f"Access request from {requester} waits for you",
                           body=f"{requester} asks for {', '.join(a.name for a in aliases)} on {team.name} "
                                f"({environment}{', project ' + project if project else ''}): {use_case}\n"
                                f"Needs an approver because: {'; '.join(reasons)}.\n\n"
                                f"Approve or deny: {absolute_link('keys:approvals')}")
        return Submitted(request, None)
    issued = _issue_for(request, actor=None, by_policy=True)
    _decide(request, status=AccessRequest.Status.APPROVED, actor=None, reason="approved by provisioning policy")
    return Submitted(request, issued)


def _decide(request: AccessRequest, *, status: str, actor: Person | None, reason: str) -> None:
    request.status, request.decided_by, request.decided_at = status, actor, timezone.now()
    request.decided_by_policy, request.decision_reason = actor is None, reason[:300]
    request.save(update_fields=["status", "decided_by", "decided_at", "decided_by_policy", "decision_reason", "key"])
    verb = "approve" if status == AccessRequest.Status.APPROVED else "deny"
    audit_record(actor=actor, actor_label=None if actor else "provisioning policy", action=f"access_request.{verb}",
                 obj=request, after={"status": status, "reason": reason, "key": request.key.prefix if request.key else None})
    webhook_emit("access_request.decided", access_request_payload(request))
    to_collect = status == AccessRequest.Status.APPROVED and request.kind == AccessRequest.Kind.NEW_KEY and not request.key
    email_after_commit(to=[request.requester], subject=f"Your access request was {status}",
                       body=f"Your {request.get_kind_display().lower()} request for {request.team.name} was {status}"
                            + (f": {reason}" if reason else ".")
                            + (" Open My keys in Tollgate to collect your key." if to_collect else "")
                            + "\n\n" + (absolute_link("keys:key-detail", request.key.pk) if request.key and not to_collect
                                          else absolute_link("keys:my-keys")))


def _pending_for(request: AccessRequest, actor: Person) -> AccessRequest:
    request = AccessRequest.objects.select_for_update(of=("self",)).select_related("team", "requester", "key").get(pk=request.pk)
    if request.status != AccessRequest.Status.PENDING:
        raise RequestRefused(f"This request was already {request.status}.")
    if request.requester_id == actor.pk:  # separation of duties: IT included, another approver decides
        raise PermissionDenied("You cannot decide your own request: another approver or IT must.")
    if not AccessRequest.objects.decidable_by(actor).filter(pk=request.pk).exists():
        raise PermissionDenied("You cannot decide requests for this team.")
    return request


@transaction.atomic
def request_approve(*, access_request: AccessRequest, actor: Person, reason: str = "") -> AccessRequest:
    """Approve. A new key is not issued here: the requester collects it (request_collect) and is the only
    one who ever sees its secret. An extension or a budget increase is applied to its key at once."""
    request = _pending_for(access_request, actor)
    if request.kind == AccessRequest.Kind.EXTENSION:
        key_extend(key=request.key, actor=actor, days=request.duration_days, reason=f"request #{request.pk}: {reason}")
    elif request.kind == AccessRequest.Kind.BUDGET:
        key = VirtualKey.objects.select_for_update().get(pk=request.key_id)
        before = {"monthly_budget": key.monthly_budget}
        key.monthly_budget = request.monthly_budget
        key.save(update_fields=["monthly_budget"])
        audit_record(actor=actor, action="key.budget_change", obj=key, before=before,
                     after={"monthly_budget": key.monthly_budget, "request": request.pk})
    _decide(request, status=AccessRequest.Status.APPROVED, actor=actor, reason=reason)
    return request


@transaction.atomic
def request_collect(*, access_request: AccessRequest, requester: Person) -> IssuedKey:
    """The requester takes the key an approver granted; its secret is shown this once."""
    request = AccessRequest.objects.select_for_update(of=("self",)).select_related("team", "requester").get(pk=access_request.pk)
    if request.requester_id != requester.pk:
        raise PermissionDenied("Only the requester can collect this key.")
    if request.kind != AccessRequest.Kind.NEW_KEY or request.status != AccessRequest.Status.APPROVED or request.key_id:
        raise RequestRefused("There is no key waiting to be collected for this request.")
    try:
        issued = _issue_for(request, actor=requester, by_policy=False)
    except PolicyNotAccepted as refusal:  # a new policy version came into force since the request
        raise RequestRefused(str(refusal)) from None
    request.save(update_fields=["key"])
    return issued


@transaction.atomic
def request_deny(*, access_request: AccessRequest, actor: Person, reason: str) -> AccessRequest:
    if not reason.strip():
        raise RequestRefused("Give a reason for the denial.", "reason")
    request = _pending_for(access_request, actor)
    _decide(request, status=AccessRequest.Status.DENIED, actor=actor, reason=reason.strip())
    return request


@transaction.atomic
def request_change(*, key: VirtualKey, requester: Person, kind: str, use_case: str, duration_days: int = 30,
                   monthly_budget: Decimal | None = None) -> AccessRequest:
    """An extension or a budget increase for an existing key; it always waits for an approver."""
    if key.person_id != requester.pk:
        raise PermissionDenied("Only the key's holder can ask for changes to it.")
    if kind == AccessRequest.Kind.BUDGET and (monthly_budget is None or monthly_budget <= (key.monthly_budget or 0)):
        raise RequestRefused("Ask for a monthly budget above the current one.", "monthly_budget")
    request = AccessRequest.objects.create(
        kind=kind, requester=requester, team=key.team, key=key, use_case=use_case or f"{kind} for {key.prefix}",
        key_class=key.key_class, duration_days=duration_days, monthly_budget=monthly_budget,
        project=key.default_tags.get("project", ""), review_reasons=[f"{kind} requested by the key holder"],
    )
    request.aliases.set(key.allowed_models.all())
    audit_record(actor=requester, action="access_request.submit", obj=request,
                 after={"kind": kind, "key": key.prefix, "days": duration_days, "budget": monthly_budget})
    webhook_emit("access_request.created", access_request_payload(request))
    email_after_commit(to=approvers_of(key.team, besides=requester),
                       subject=f"{requester} asks for {AccessRequest.Kind(kind).label.lower()}",
                       body=f"{requester} asks for {AccessRequest.Kind(kind).label.lower()} on key {key.prefix}…: {use_case}\n\n"
                            f"Approve or deny: {absolute_link('keys:approvals')}")
    return request

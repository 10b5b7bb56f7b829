"""The usage dashboard's data, scoped by role in one place (usage_scope): spend over time with the month-end
forecast, breakdowns, errors and refusals from the daily rollups; the most expensive recent calls from the
ledger; grants, keys and requests that need attention. Each section is a Table that the page draws (a chart,
then the table) and exports as CSV, so both show the same cells."""
import calendar
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from functools import cached_property

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q, Sum
from django.utils import timezone
from django.utils.safestring import SafeString
from django.utils.timesince import timesince

from budgets.enforcement import period_start
from budgets.models import Grant, IncreaseRequest
from gateway.models import ModelAlias, ProviderModel
from governance import charts
from governance.models import CostCenter, Membership, Person, Team
from keys.models import AccessRequest, VirtualKey
from ledger.models import DailyRollup, LedgerEntry, RollupState

PERIODS = {"month": "This month", "last_month": "Last month", "30d": "Last 30 days", "90d": "Last 90 days",
           "365d": "Last 12 months"}
GRANULARITIES = {"day": "Day", "week": "Week", "month": "Month"}
TABLE_ROWS = 25  # rows of a breakdown table (and its CSV); the rest are summed on an "Others" row
CHART_BARS = 10
NEAR_LIMIT_PERCENT = 80
EXPIRY_WINDOWS = (7, 30)
UNUSED_DAYS = 30
EXPENSIVE_CALL_DAYS = 7


# --- who sees what -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UsageScope:
    """What a person's dashboard covers: everything (Finance, IT, auditors: perms.ledger.view_ledgerentry),
    the teams they own or manage (owner or approver) plus their own spend, or their own spend only."""

    person: Person
    everything: bool
    team_ids: tuple[int, ...] = ()
    key_ids: tuple[int, ...] = ()

    @property
    def kind(self) -> str:
        return "all" if self.everything else "teams" if self.team_ids else "own"

    @property
    def label(self) -> str:
        return {"all": "Everyone's usage", "teams": "Your teams' usage and your own", "own": "Your own usage"}[self.kind]

    def rollups(self) -> Q:
        if self.everything:
            return Q()
        return Q(person_id=self.person.pk) | Q(team_id__in=self.team_ids) if self.team_ids else Q(person_id=self.person.pk)

    def ledger(self) -> Q:
        # The ledger has no index by person: a person's calls are reached through their keys ((key, created_at)),
        # a team's through (team, created_at).
        if self.everything:
            return Q()
        own = Q(key_id__in=self.key_ids)
        return own | Q(team_id__in=self.team_ids) if self.team_ids else own

    def keys(self):
        """As VirtualKey.objects.visible_to: own keys and the managed teams' keys."""
        keys = VirtualKey.objects.all()
        return keys if self.everything else keys.filter(Q(person=self.person) | Q(team_id__in=self.team_ids))

    def grants(self):
        grants = Grant.objects.all()
        if self.everything:
            return grants
        mine = Q(owner=self.person) | Q(person=self.person) | Q(key__person=self.person)
        return grants.filter(mine | Q(team_id__in=self.team_ids) | Q(key__team_id__in=self.team_ids))

    def access_requests(self):
        requests = AccessRequest.objects.all()
        return requests if self.everything else requests.filter(Q(requester=self.person) | Q(team_id__in=self.team_ids))

    def increase_requests(self):
        requests = IncreaseRequest.objects.all()
        if self.everything:
            return requests
        return requests.filter(Q(requester=self.person) | Q(approver=self.person) | Q(grant__owner=self.person)
                               | Q(grant__team_id__in=self.team_ids))


def usage_scope(person) -> UsageScope:
    """The one decision of what the usage pages show `person`."""
    if person.has_perm("ledger.view_ledgerentry"):
        return UsageScope(person=person, everything=True)
    managed = Membership.objects.filter(person=person, role__in=[Membership.Role.OWNER, Membership.Role.APPROVER])
    team_ids = Team.objects.filter(Q(owner=person) | Q(pk__in=managed.values("team_id"))).values_list("pk", flat=True)
    key_ids = VirtualKey.objects.filter(person=person).values_list("pk", flat=True)
    return UsageScope(person=person, everything=False, team_ids=tuple(sorted(team_ids)), key_ids=tuple(sorted(key_ids)))


# --- periods and the forecast ------------------------------------------------------------------------------

def period_bounds(period: str, today: date) -> tuple[date, date]:
    """First and last local day of a period (PERIODS), both included."""
    month_start = today.replace(day=1)
    if period == "last_month":
        last = month_start - timedelta(days=1)
        return last.replace(day=1), last
    days = {"30d": 30, "90d": 90, "365d": 365}.get(period)
    return (today - timedelta(days=days - 1), today) if days else (month_start, today)


def bucket_of(day: date, granularity: str) -> date:
    if granularity == "week":
        return day - timedelta(days=day.weekday())
    if granularity == "month":
        return day.replace(day=1)
    return day


def bucket_label(bucket: date, granularity: str) -> str:
    return f"{bucket:%Y-%m}" if granularity == "month" else bucket.isoformat()


def month_end_forecast(spent: Decimal, now: datetime) -> Decimal:
    """The month's spend if it goes on at the month-to-date rate: linear over the time elapsed (at least a day,
    so the first hours of a month do not extrapolate one call to a fortune)."""
    local = timezone.localtime(now)
    start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    elapsed = max(Decimal((local - start).total_seconds()) / Decimal(86400), Decimal(1))
    days = calendar.monthrange(local.year, local.month)[1]
    return (spent / elapsed * days).quantize(Decimal("0.01"))


# --- tables ------------------------------------------------------------------------------------------------

@dataclass
class Table:
    """A section of the page: its chart(s), then its table; the CSV export writes the same columns and cells."""

    name: str
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    empty: str = "Nothing in this period."
    charts: list[SafeString] = field(default_factory=list)
    note: str = ""


def money(value) -> str:
    return f"{Decimal(value or 0).quantize(Decimal('0.01'))}"


def _cost_column() -> str:
    return f"Spend ({settings.TOLLGATE_CURRENCY})"


# The dimensions of the breakdowns: rollup column, section name, title, label of "none".
BREAKDOWNS = [
    ("team_id", "by_team", "By team", "(no team)"),
    ("alias_id", "by_alias", "By model (alias)", "(no alias)"),
    ("provider_model_id", "by_provider_model", "By provider model", "(no model)"),
    ("provider", "by_provider", "By provider", "(no provider)"),
    ("person_id", "by_person", "Top people", "(service keys)"),
    ("key_id", "by_key", "Top keys", "(no key)"),
    ("cost_center_id", "by_cost_center", "By cost center", "(no cost center)"),
    ("project", "by_project", "By project tag", "(untagged)"),
]
SECTIONS = ["over_time", "forecast", *[name for _, name, _, _ in BREAKDOWNS], "expensive_calls", "failed_by_error",
            "refused_by_reason", "grants_near_limit", "expiring", "unused_keys", "pending_requests",
            "pending_increases"]


class Usage:
    """One person's dashboard for a period: every section a cached property, so a CSV of one section reads
    only what that section needs."""

    def __init__(self, *, scope: UsageScope, period: str = "month", granularity: str = "day",
                 now: datetime | None = None) -> None:
        self.scope, self.period, self.granularity = scope, period, granularity
        self.now = now or timezone.now()
        self.today = timezone.localtime(self.now).date()
        self.start, self.end = period_bounds(period, self.today)
        self._tables: dict[str, Table] = {}

    def section(self, name: str) -> Table:
        if name not in SECTIONS:
            raise KeyError(name)
        if name not in self._tables:
            breakdown = next((b for b in BREAKDOWNS if b[1] == name), None)
            self._tables[name] = self._breakdown(*breakdown) if breakdown else getattr(self, name)
        return self._tables[name]

    def sections(self) -> list[Table]:
        return [self.section(name) for name in SECTIONS]

    @cached_property
    def rolled_up_at(self):
        state = RollupState.objects.filter(pk=1).first()
        return state.updated_at if state else None

    def _rollups(self, start: date, end: date):
        return DailyRollup.objects.filter(self.scope.rollups(), day__gte=start, day__lte=end).order_by()

    def _daily(self, start: date, end: date) -> dict[date, dict]:
        rows = (self._rollups(start, end).values("day")
                .annotate(calls=Sum("calls"), input=Sum("input_tokens"), output=Sum("output_tokens"), cost=Sum("cost")))
        return {row["day"]: row for row in rows}

    @cached_property
    def daily(self) -> dict[date, dict]:
        return self._daily(self.start, self.end)

    @cached_property
    def month_to_date(self) -> dict[date, dict]:
        month_start = self.today.replace(day=1)
        if (self.start, self.end) == (month_start, self.today):
            return self.daily
        return self._daily(month_start, self.today)

    # --- over time and forecast

    @cached_property
    def over_time(self) -> Table:
        buckets: dict[date, list] = {}
        day = self.start
        while day <= self.end:  # every bucket, empty ones too, so the line does not skip time
            buckets.setdefault(bucket_of(day, self.granularity), [0, 0, Decimal(0)])
            day += timedelta(days=1)
        for day, row in self.daily.items():
            bucket = buckets[bucket_of(day, self.granularity)]
            bucket[0] += row["calls"] or 0
            bucket[1] += (row["input"] or 0) + (row["output"] or 0)
            bucket[2] += row["cost"] or 0
        rows = [[bucket_label(b, self.granularity), calls, tokens, money(cost)] for b, (calls, tokens, cost) in buckets.items()]
        table = Table("over_time", f"Spend and tokens by {GRANULARITIES[self.granularity].lower()}",
                      [GRANULARITIES[self.granularity], "Calls", "Tokens", _cost_column()], rows)
        if not self.daily:
            table.rows, table.empty = [], "No usage in this period."
            return table
        table.charts = [
            charts.line_chart(chart_id="chart-spend", title=f"Spend ({settings.TOLLGATE_CURRENCY}) by "
                              f"{self.granularity}, {self.start} to {self.end}", points=[(r[0], Decimal(r[3])) for r in rows]),
            charts.line_chart(chart_id="chart-tokens", title=f"Tokens by {self.granularity}, {self.start} to {self.end}",
                              points=[(r[0], r[2]) for r in rows]),
        ]
        return table

    @cached_property
    def forecast_amount(self) -> Decimal:
        return month_end_forecast(self.month_spent, self.now)

    @cached_property
    def month_spent(self) -> Decimal:
        return sum((row["cost"] or 0 for row in self.month_to_date.values()), Decimal(0))

    @cached_property
    def forecast(self) -> Table:
        month_start = self.today.replace(day=1)
        month_end = month_start.replace(day=calendar.monthrange(self.today.year, self.today.month)[1])
        table = Table("forecast", f"This month to date and the month-end forecast ({self.today:%B %Y})",
                      ["Day", _cost_column(), "Month to date", "Kind"],
                      note="Linear from the month-to-date rate.")
        if not self.month_to_date:
            table.empty = "No spend this month yet: nothing to forecast."
            return table
        total, points = Decimal(0), []
        day = month_start
        while day <= self.today:
            spent = self.month_to_date.get(day, {}).get("cost") or Decimal(0)
            total += spent
            points.append((day.isoformat(), total))
            table.rows.append([day.isoformat(), money(spent), money(total), "actual"])
            day += timedelta(days=1)
        table.rows.append([month_end.isoformat(), "", money(self.forecast_amount), "forecast"])
        table.charts = [charts.line_chart(
            chart_id="chart-forecast", title=f"Spend this month to date ({money(total)} {settings.TOLLGATE_CURRENCY}) "
            f"and forecast for the month ({money(self.forecast_amount)} {settings.TOLLGATE_CURRENCY})",
            points=points, forecast=[points[-1], (month_end.isoformat(), self.forecast_amount)])]
        return table

    # --- breakdowns, from one grouped read of the period's rollups

    @cached_property
    def groups(self) -> list[dict]:
        """The period's rollups summed per team, person, key, cost center, model, project and error code: one
        query; every breakdown and the error tables fold these groups (a few thousand at most) in Python."""
        with transaction.atomic():
            if connection.vendor == "postgresql":
                # Grouping by eight columns sorts on disk under the default 4 MB of work_mem (450 ms over a
                # quarter of the ledger benchmark's rollups); in memory it is a hash (200 ms). This query only.
                with connection.cursor() as cursor:
                    cursor.execute("SET LOCAL work_mem = '64MB'")
            return list(self._rollups(self.start, self.end)
                    .values("team_id", "person_id", "key_id", "cost_center_id", "alias_id", "provider_model_id",
                            "project", "error_code")
                    .annotate(calls=Sum("calls"), refused=Sum("refused"), failed=Sum("failed"),
                              input=Sum("input_tokens"), output=Sum("output_tokens"), cost=Sum("cost")))

    @cached_property
    def _names(self) -> dict[str, dict]:
        ids = defaultdict(set)
        for group in self.groups:
            for column in ("team_id", "person_id", "key_id", "cost_center_id", "alias_id", "provider_model_id"):
                if group[column] is not None:
                    ids[column].add(group[column])
        models = ProviderModel.objects.select_related("provider").in_bulk(ids["provider_model_id"])
        return {
            "team_id": {pk: t.name for pk, t in Team.objects.in_bulk(ids["team_id"]).items()},
            "person_id": {pk: str(p) for pk, p in Person.objects.in_bulk(ids["person_id"]).items()},
            "key_id": {pk: f"{k.name} ({k.prefix}…)" for pk, k in VirtualKey.objects.in_bulk(ids["key_id"]).items()},
            "cost_center_id": {pk: str(c) for pk, c in CostCenter.objects.in_bulk(ids["cost_center_id"]).items()},
            "alias_id": {pk: a.name for pk, a in ModelAlias.objects.in_bulk(ids["alias_id"]).items()},
            "provider_model_id": {pk: f"{m.provider.name} {m.name}" for pk, m in models.items()},
            "provider": {pk: m.provider.name for pk, m in models.items()},
        }

    def _breakdown(self, column: str, name: str, title: str, none: str) -> Table:
        totals: dict = defaultdict(lambda: [0, 0, Decimal(0)])
        names = self._names.get(column, {})
        for group in self.groups:
            if column == "provider":
                label = names.get(group["provider_model_id"], none)
            elif column == "project":
                label = group["project"] or none
            else:
                label = none if group[column] is None else names.get(group[column], f"#{group[column]}")
            line = totals[label]
            line[0] += group["calls"] or 0
            line[1] += (group["input"] or 0) + (group["output"] or 0)
            line[2] += group["cost"] or 0
        ranked = sorted(totals.items(), key=lambda item: (-item[1][2], -item[1][1], item[0]))
        rows = [[label, calls, tokens, money(cost)] for label, (calls, tokens, cost) in ranked[:TABLE_ROWS]]
        rest = ranked[TABLE_ROWS:]
        if rest:
            rows.append([f"Others ({len(rest)})", sum(r[1][0] for r in rest), sum(r[1][1] for r in rest),
                         money(sum((r[1][2] for r in rest), Decimal(0)))])
        label = {"by_person": "Person", "by_key": "Key"}.get(name, title.removeprefix("By ").capitalize())
        table = Table(name, title, [label, "Calls", "Tokens", _cost_column()], rows, empty="No usage in this period.")
        if rows:
            table.charts = [charts.bar_chart(chart_id=f"chart-{name}", title=f"{title}: spend ({settings.TOLLGATE_CURRENCY}), "
                                             f"{self.start} to {self.end}",
                                             bars=[(r[0], Decimal(r[3])) for r in rows[:CHART_BARS]])]
        return table

    def _by_error(self, measure: str, name: str, title: str, empty: str) -> Table:
        totals: dict[str, int] = defaultdict(int)
        for group in self.groups:
            if group[measure]:
                totals[group["error_code"] or "(not recorded)"] += group[measure]
        rows = [[code, count] for code, count in sorted(totals.items(), key=lambda item: (-item[1], item[0]))]
        table = Table(name, title, ["Error code", "Calls"], rows, empty=empty)
        if rows:
            table.charts = [charts.bar_chart(chart_id=f"chart-{name}", title=f"{title}, {self.start} to {self.end}",
                                             bars=rows[:CHART_BARS])]
        return table

    @cached_property
    def failed_by_error(self) -> Table:
        return self._by_error("failed", "failed_by_error", "Failed calls by upstream error",
                              "No failed calls in this period.")

    @cached_property
    def refused_by_reason(self) -> Table:
        return self._by_error("refused", "refused_by_reason", "Refused calls by reason",
                              "No refused calls in this period.")

    # --- from the ledger: the most expensive recent calls

    @cached_property
    def expensive_calls(self) -> Table:
        """The ledger's own rows (a rollup has no single call), bounded by created_at so only the last
        partition or two are read."""
        since = self.now - timedelta(days=EXPENSIVE_CALL_DAYS)
        entries = list(LedgerEntry.objects.filter(self.scope.ledger(), created_at__gte=since, created_at__lte=self.now)
                       .exclude(outcome=LedgerEntry.Outcome.ADJUSTMENT).order_by("-cost", "-id")
                       .values("created_at", "key_id", "person_id", "team_id", "model_requested", "input_tokens",
                               "output_tokens", "cost", "outcome")[:10])
        keys = VirtualKey.objects.in_bulk({e["key_id"] for e in entries if e["key_id"]})
        people = Person.objects.in_bulk({e["person_id"] for e in entries if e["person_id"]})
        teams = Team.objects.in_bulk({e["team_id"] for e in entries if e["team_id"]})
        rows = [[f"{timezone.localtime(e['created_at']):%Y-%m-%d %H:%M}",
                 str(keys[e["key_id"]].prefix) if e["key_id"] in keys else "",
                 str(people[e["person_id"]]) if e["person_id"] in people else "",
                 teams[e["team_id"]].name if e["team_id"] in teams else "", e["model_requested"],
                 e["input_tokens"] + e["output_tokens"], money(e["cost"]), e["outcome"]] for e in entries]
        return Table("expensive_calls", f"Most expensive calls of the last {EXPENSIVE_CALL_DAYS} days",
                     ["Time", "Key", "Person", "Team", "Model", "Tokens", _cost_column(), "Outcome"], rows,
                     empty=f"No calls in the last {EXPENSIVE_CALL_DAYS} days.")

    # --- what needs attention

    @cached_property
    def grants_near_limit(self) -> Table:
        """Active grants at NEAR_LIMIT_PERCENT of their limit or over, spend from the rollups of each grant's
        period (one query for all of them) rather than a counter read or a ledger scan per grant: the page
        shows usage as rolled up, like every other section."""
        grants = list(self.scope.grants().filter(status=Grant.Status.ACTIVE, limit_amount__gt=0)
                      .select_related("owner", "team"))
        table = Table("grants_near_limit", f"Grants at {NEAR_LIMIT_PERCENT}% of their limit or over",
                      ["Grant", "Owner", "Period", "Since", _cost_column(), "Limit", "Used", "State"],
                      empty=f"No grant is at {NEAR_LIMIT_PERCENT}% of its limit.")
        if not grants:
            return table
        since = {g.pk: timezone.localtime(period_start(g.period, term_start=g.term_start, now=self.now)).date()
                 for g in grants}
        spent: dict[int, Decimal] = defaultdict(Decimal)
        paths = (DailyRollup.objects.filter(day__gte=min(since.values()), day__lte=self.today).exclude(grant_path="")
                 .values("grant_path", "day").annotate(cost=Sum("cost")).order_by())
        for row in paths:
            for part in row["grant_path"].strip(",").split(","):
                grant_id = int(part) if part.isdigit() else None
                if grant_id in since and row["day"] >= since[grant_id]:
                    spent[grant_id] += row["cost"] or 0
        lines = []
        for grant in grants:
            percent = spent[grant.pk] / grant.limit_amount * 100
            if percent >= NEAR_LIMIT_PERCENT:
                lines.append((percent, grant))
        for percent, grant in sorted(lines, key=lambda line: -line[0]):
            table.rows.append([grant.name, str(grant.owner), grant.get_period_display(), since[grant.pk].isoformat(),
                               money(spent[grant.pk]), money(grant.limit_amount), f"{percent:.0f}%",
                               "over" if percent >= 100 else "near"])
        return table

    @cached_property
    def expiring(self) -> Table:
        horizon = self.now + timedelta(days=EXPIRY_WINDOWS[-1])
        keys = (self.scope.keys().filter(status=VirtualKey.Status.ACTIVE, expires_at__gt=self.now, expires_at__lte=horizon)
                .select_related("team").order_by("expires_at")[:TABLE_ROWS])
        grants = (self.scope.grants().filter(status=Grant.Status.ACTIVE, renews_at__gte=self.today,
                                             renews_at__lte=horizon.date()).select_related("team").order_by("renews_at")[:TABLE_ROWS])
        items = [("Key", f"{k.name} ({k.prefix}…)", k.team.name, timezone.localtime(k.expires_at).date()) for k in keys]
        items += [("Grant", g.name, g.team.name if g.team else "", g.renews_at) for g in grants]
        rows = []
        for kind, name, team, ends in sorted(items, key=lambda item: item[3]):
            days = (ends - self.today).days
            window = next(f"within {w} days" for w in EXPIRY_WINDOWS if days <= w)
            rows.append([kind, name, team, ends.isoformat(), days, window])
        return Table("expiring", f"Keys and grants expiring within {' or '.join(map(str, EXPIRY_WINDOWS))} days",
                     ["Kind", "Name", "Team", "Ends", "Days left", "Window"], rows,
                     empty=f"Nothing expires within {EXPIRY_WINDOWS[-1]} days.")

    @cached_property
    def unused_keys(self) -> Table:
        cutoff = self.now - timedelta(days=UNUSED_DAYS)
        keys = (self.scope.keys().filter(status=VirtualKey.Status.ACTIVE)
                .filter(Q(last_used_at__lt=cutoff) | Q(last_used_at__isnull=True, created_at__lt=cutoff))
                .select_related("team", "person").order_by("last_used_at", "created_at")[:TABLE_ROWS])
        rows = [[f"{k.name} ({k.prefix}…)", str(k.person) if k.person else "(service key)", k.team.name,
                 f"{timezone.localtime(k.last_used_at):%Y-%m-%d}" if k.last_used_at else "never",
                 f"{timezone.localtime(k.created_at):%Y-%m-%d}"] for k in keys]
        return Table("unused_keys", f"Active keys unused for {UNUSED_DAYS} days", ["Key", "Holder", "Team", "Last used", "Created"],
                     rows, empty=f"Every active key was used in the last {UNUSED_DAYS} days.",
                     note=f"The {TABLE_ROWS} unused the longest." if len(rows) == TABLE_ROWS else "")

    @cached_property
    def pending_requests(self) -> Table:
        requests = (self.scope.access_requests().filter(status=AccessRequest.Status.PENDING)
                    .select_related("requester", "team").order_by("created_at")[:TABLE_ROWS])
        rows = [[f"{r.created_at:%Y-%m-%d %H:%M}", str(r.requester), r.team.name, r.get_kind_display(),
                 r.get_environment_display(), r.project, timesince(r.created_at, self.now)] for r in requests]
        return Table("pending_requests", "Pending access requests",
                     ["Requested", "Requester", "Team", "Kind", "Environment", "Project", "Age"], rows,
                     empty="No access request is waiting.")

    @cached_property
    def pending_increases(self) -> Table:
        requests = (self.scope.increase_requests().filter(status=IncreaseRequest.Status.PENDING)
                    .select_related("requester", "grant", "approver").order_by("created_at")[:TABLE_ROWS])
        rows = [[f"{r.created_at:%Y-%m-%d %H:%M}", str(r.requester), r.grant.name, money(r.from_limit or r.grant.limit_amount),
                 money(r.new_limit), str(r.approver) if r.approver else "IT", timesince(r.created_at, self.now)]
                for r in requests]
        return Table("pending_increases", "Pending budget increase requests",
                     ["Requested", "Requester", "Grant", "From", "To", "Waits for", "Age"], rows,
                     empty="No increase request is waiting.")

"""Admin for big tables (ledger entries, audit events): changelists that never count or de-duplicate the
whole table. Counts are the planner's estimate on PostgreSQL (exact, with a cap, when the estimate is small),
filters offer values seen in recent rows instead of SELECT DISTINCT over every row, and the order is the
primary key's (an index walk, newest first)."""
import json

from django.contrib import admin
from django.contrib.admin.utils import lookup_spawns_duplicates
from django.core.paginator import EmptyPage, PageNotAnInteger, Paginator
from django.db import connections
from django.utils.functional import cached_property

EXACT_COUNT_CAP = 10_000


def _leaf_tuples(connection, table: str) -> float:
    """pg_class.reltuples summed over a partitioned table's partitions (or the table itself); never-analysed
    relations (-1) count as empty, so a small or unknown estimate falls back to the capped exact count."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0) FROM pg_class c "
            "WHERE c.oid = %s::regclass AND c.relkind = 'r' "
            "OR c.oid IN (SELECT relid FROM pg_partition_tree(%s::regclass) WHERE isleaf)",
            [table, table],
        )
        return float(cursor.fetchone()[0])


def _planned_rows(queryset) -> float:
    """The planner's row estimate for a filtered queryset (EXPLAIN only plans; nothing is read)."""
    connection = connections[queryset.db]
    sql, params = queryset.order_by().values("pk").query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return float(plan[0]["Plan"]["Plan Rows"])


def estimated_count(queryset, cap: int = EXACT_COUNT_CAP) -> tuple[int, bool]:
    """(count, exact). Above `cap` rows the count is the PostgreSQL planner's estimate (elsewhere: cap + 1);
    at or below it, an exact COUNT over at most cap + 1 rows."""
    connection = connections[queryset.db]
    if connection.vendor == "postgresql":
        if queryset.query.where:
            estimate = _planned_rows(queryset)
        else:
            estimate = _leaf_tuples(connection, queryset.model._meta.db_table)
        if estimate > cap:
            return int(estimate), False
    # COUNT(*) over a LIMITed subquery: reads at most cap + 1 rows, however big the table.
    capped = queryset.order_by().values("pk")[: cap + 1].count()
    if capped > cap:
        return cap + 1, False
    return capped, True


class EstimatedCountPaginator(Paginator):
    """A paginator that does not count the table. Past an estimated count, later pages still open (they may
    be empty): the estimate may be short of the truth."""

    exact_up_to = EXACT_COUNT_CAP

    @cached_property
    def _estimate(self) -> tuple[int, bool]:
        return estimated_count(self.object_list, self.exact_up_to)

    @cached_property
    def count(self) -> int:
        return self._estimate[0]

    @property
    def exact(self) -> bool:
        return self._estimate[1]

    @property
    def estimated(self) -> bool:
        """The pagination template (admin/keys/pagination.html) says "about" when set."""
        return not self._estimate[1]

    def validate_number(self, number):
        if self.exact:
            return super().validate_number(number)
        try:
            number = int(number)
        except (TypeError, ValueError):
            raise PageNotAnInteger("That page number is not an integer")
        if number < 1:
            raise EmptyPage("That page number is less than 1")
        return number

    def page(self, number):
        if self.exact:
            return super().page(number)
        number = self.validate_number(number)
        bottom = (number - 1) * self.per_page
        return self._get_page(self.object_list[bottom: bottom + self.per_page], number, self)


class RecentValuesFilter(admin.SimpleListFilter):
    """Choices are the values found in the newest `sample` rows (by primary key), not a SELECT DISTINCT over
    the whole table; any value still filters through the URL. Make one with `recent_values_filter`."""

    field_name = ""
    sample = 5_000

    def lookups(self, request, model_admin):
        recent = model_admin.get_queryset(request).order_by("-pk").values_list(self.field_name, flat=True)[: self.sample]
        return [(value, value) for value in sorted({value for value in recent if value not in (None, "")})]

    def queryset(self, request, queryset):
        value = self.value()
        return queryset.filter(**{self.field_name: value}) if value else queryset


def recent_values_filter(field_name: str, title: str | None = None, sample: int = 5_000) -> type[RecentValuesFilter]:
    return type(f"Recent{field_name.title().replace('_', '')}Filter", (RecentValuesFilter,), {
        "field_name": field_name, "parameter_name": field_name, "sample": sample,
        "title": title or field_name.replace("_", " "),
    })


class LargeTableAdminMixin:
    """For a ModelAdmin over a big table: no full count, an estimating paginator, no DISTINCT from search,
    newest first by primary key, and heavy columns the list does not show deferred (`changelist_defer`)."""

    show_full_result_count = False
    paginator = EstimatedCountPaginator
    ordering = ["-pk"]
    changelist_defer: tuple[str, ...] = ()

    def get_search_results(self, request, queryset, search_term):
        queryset, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        # Columns of the model or of forward foreign keys cannot repeat a row: no DISTINCT over every partition.
        if may_have_duplicates and not any(
            lookup_spawns_duplicates(self.opts, field.lstrip("=^@")) for field in self.get_search_fields(request)
        ):
            may_have_duplicates = False
        return queryset, may_have_duplicates

    def get_changelist(self, request, **kwargs):
        changelist = super().get_changelist(request, **kwargs)
        defer = self.changelist_defer
        if not defer:
            return changelist

        class DeferringChangeList(changelist):
            def get_queryset(self, request, exclude_parameters=None):
                return super().get_queryset(request, exclude_parameters).defer(*defer)

        return DeferringChangeList

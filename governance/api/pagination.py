"""Page-number pagination for small lists; cursor pagination for the large, append-only tables (ledger
entries, audit events), whose pages stay stable while rows are added and cost no COUNT(*)."""
from rest_framework.pagination import CursorPagination, PageNumberPagination


class StandardPagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class NewestFirstCursorPagination(CursorPagination):
    ordering = "-id"
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000

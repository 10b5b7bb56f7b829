"""Cells a spreadsheet will show, never run: every export of caller-controlled text (chargeback, ledger rows,
reconciliations) goes through `safe_cell`.

A text cell starting with =, +, -, @, a tab or a carriage return is read by Excel, LibreOffice and Google
Sheets as a formula (`=HYPERLINK(...)` in a project tag becomes a live link in finance's sheet). Such a cell
gets a leading apostrophe, which every one of them shows as text (OWASP's CSV-injection rule). Numbers, and
text that is a plain number ("-0.50" from an adjustment), are left as they are so totals still add up.
django-import-export's own escaping only strips a leading "=", and turns every cell into text.
"""
from decimal import Decimal, InvalidOperation

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value):
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    try:
        Decimal(value)
    except InvalidOperation:
        return "'" + value
    return value

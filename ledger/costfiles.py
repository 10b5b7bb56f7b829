"""Provider cost and usage files: which kind a file is (detected from its content, checked against the
provider), and its lines, one at a time, each either a BilledLine or the reason it cannot be one.

Kinds (fixtures written from the providers' published shapes are in tests/ledger/fixtures/provider_files):
OpenAI's costs API and usage API (completions) pages, OpenAI's usage dashboard cost export, Anthropic's cost
report and console cost export, and a generic CSV. Days are the providers' UTC days. Amounts are Decimals
in the file's currency (Anthropic's API reports cents; its console export dollars).
"""
import codecs
import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from datetime import timezone as dt_timezone
from decimal import Decimal, InvalidOperation

from ledger.models import ProviderCostImport, ProviderCostLine

Source = ProviderCostImport.Source
Measure = ProviderCostLine.Measure

MAX_AMOUNT = Decimal(10) ** 10  # what the amount columns hold (18 digits, 8 after the point)
MAX_TOKENS = 10 ** 15
KINDS = {  # which provider kinds may send which files
    Source.OPENAI_COSTS: {"openai", "azure_openai"}, Source.OPENAI_USAGE: {"openai", "azure_openai"},
    Source.OPENAI_DASHBOARD_CSV: {"openai", "azure_openai"},
    Source.ANTHROPIC_COSTS: {"anthropic"}, Source.ANTHROPIC_CONSOLE_CSV: {"anthropic"},
    Source.CSV: None,  # any provider; its provider column, when filled, must name this one
}


class NotThisKind(Exception):
    """The file is not of any kind Tollgate reads (or not of the kind asked for)."""


@dataclass(frozen=True)
class BilledLine:
    day: date
    model: str
    measure: str = Measure.COST
    project: str = ""
    line_item: str = ""
    api_key: str = ""
    token_type: str = ""
    service_tier: str = ""
    currency: str = ""
    amount: Decimal = Decimal(0)
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    tokens: int = 0
    provider: str = ""  # the file's provider column (generic CSV), checked against the import's provider

    def identity(self) -> str:
        """The provider's own line identity: bucket, line item, model, project, API key, token type, service
        tier, currency. Never the amount: a restated line is the same line with a new amount."""
        parts = (self.measure, self.day, self.line_item, self.model, self.project, self.api_key, self.token_type,
                 self.service_tier, self.currency)
        return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]

    def problem(self) -> str | None:
        if not self.amount.is_finite() or abs(self.amount) >= MAX_AMOUNT:
            return f"the amount {self.amount} is not an amount of money"
        for count in (self.tokens, self.input_tokens, self.output_tokens, self.cached_tokens):
            if not 0 <= count < MAX_TOKENS:
                return f"{count} is not a token count"
        return None


Numbered = Iterator[tuple[int, "BilledLine | str"]]  # (line number, the line or why it is rejected)


def _model_of(text: str) -> str:
    """OpenAI line items read "gpt-4o-mini-2024-07-18, input": the model is before the comma."""
    return (text or "").split(",")[0].strip().lower()


def _decimal(value) -> Decimal:
    if isinstance(value, float):
        value = repr(value)
    try:
        return Decimal(str(value).strip().replace(",", "")) if value not in (None, "") else Decimal(0)
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a number") from None


def _int(value) -> int:
    if value in (None, ""):
        return 0
    number = _decimal(value)
    if number != number.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


def _utc_day(value) -> date:
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=dt_timezone.utc).date()
    text = str(value).strip()
    if text.isdigit():
        return datetime.fromtimestamp(int(text), tz=dt_timezone.utc).date()
    if len(text) <= 10:
        return date.fromisoformat(text)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" UTC", "+00:00"))
    return (moment.astimezone(dt_timezone.utc) if moment.tzinfo else moment).date()


# --- JSON pages (the providers' APIs, fetched or saved) ------------------------------------------------------

def _buckets(document) -> list:
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise NotThisKind("a JSON file without a list of buckets under \"data\"")
    return document["data"]


def detect_json(document) -> str:
    results = [r for bucket in _buckets(document) if isinstance(bucket, dict)
               for r in (bucket.get("results") or []) if isinstance(r, dict)]
    objects = {r.get("object") for r in results}
    if "organization.costs.result" in objects:
        return Source.OPENAI_COSTS
    if "organization.usage.completions.result" in objects:
        return Source.OPENAI_USAGE
    if any(str(o or "").startswith("organization.usage.") for o in objects):
        raise NotThisKind("an OpenAI usage file of a kind other than completions")
    if results and all("amount" in r and "currency" in r for r in results) and \
            all(isinstance(b, dict) and "starting_at" in b for b in document["data"]):
        return Source.ANTHROPIC_COSTS
    if not results:
        raise NotThisKind("a file with no lines")
    raise NotThisKind("a JSON file of no kind Tollgate reads")


def _json_lines(source: str, document) -> Numbered:
    number = 0
    for bucket in _buckets(document):
        for result in (bucket.get("results") or []) if isinstance(bucket, dict) else []:
            number += 1
            try:
                yield number, _json_line(source, bucket, result)
            except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as exc:
                yield number, f"{type(exc).__name__}: {exc}"


def _json_line(source: str, bucket: dict, result: dict) -> BilledLine:
    if source == Source.OPENAI_COSTS:
        amount = result.get("amount") or {}
        item = result.get("line_item") or ""
        return BilledLine(day=_utc_day(bucket["start_time"]), model=_model_of(item), line_item=item,
                          project=result.get("project_id") or "", api_key=result.get("api_key_id") or "",
                          amount=_decimal(amount.get("value")),
                          currency=str(amount.get("currency") or "").upper())
    if source == Source.OPENAI_USAGE:
        input_tokens, output_tokens = _int(result.get("input_tokens")), _int(result.get("output_tokens"))
        return BilledLine(day=_utc_day(bucket["start_time"]), model=(result.get("model") or "").lower(),
                          measure=Measure.USAGE, project=result.get("project_id") or "",
                          api_key=result.get("api_key_id") or "", service_tier=result.get("service_tier") or "",
                          line_item="batch" if result.get("batch") else "",
                          input_tokens=input_tokens, output_tokens=output_tokens,
                          cached_tokens=_int(result.get("input_cached_tokens")), tokens=input_tokens + output_tokens)
    # Anthropic's cost report: amounts in the currency's lowest unit (cents), as decimal strings.
    item = " / ".join(str(result[f]) for f in ("description", "cost_type", "context_window", "inference_geo") if result.get(f))
    return BilledLine(day=_utc_day(bucket["starting_at"]), model=(result.get("model") or "").lower(),
                      project=result.get("workspace_id") or "", line_item=item,
                      token_type=result.get("token_type") or "", service_tier=result.get("service_tier") or "",
                      currency=str(result.get("currency") or "").upper(), amount=_decimal(result.get("amount")) / 100)


# --- CSV exports -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CsvKind:
    source: str
    required: frozenset[str]  # header columns (lowercased) that identify the kind

    def line(self, row: dict) -> BilledLine:
        raise NotImplementedError


class GenericCsv(CsvKind):
    def line(self, row: dict) -> BilledLine:
        return BilledLine(day=_utc_day(row["date"]), model=(row.get("model") or "").strip().lower(),
                          project=(row.get("project") or "").strip(), line_item=(row.get("line_item") or "").strip(),
                          api_key=(row.get("api_key") or "").strip(), token_type=(row.get("token_type") or "").strip(),
                          service_tier=(row.get("service_tier") or "").strip(),
                          currency=(row.get("currency") or "").strip().upper(), tokens=_int(row.get("tokens")),
                          amount=_decimal(row["amount"]), provider=(row.get("provider") or "").strip())


class OpenAIDashboardCsv(CsvKind):
    """The usage dashboard's cost export: one row per day, project and line item, amounts in dollars."""

    def line(self, row: dict) -> BilledLine | None:
        item = (row.get("line_item") or "").strip()
        if not item and not (row.get("amount_value") or "").strip():
            return None  # a day without charges: only its time columns are filled
        return BilledLine(day=_utc_day(row.get("start_time_iso") or row["start_time"]), model=_model_of(item), line_item=item,
                          project=(row.get("project_id") or "").strip(), api_key=(row.get("api_key_id") or "").strip(),
                          amount=_decimal(row["amount_value"]),
                          currency=(row.get("amount_currency") or "").strip().upper())


class AnthropicConsoleCsv(CsvKind):
    """The console's cost export: one row per day, workspace, API key, model and token type, in dollars. Its
    models are display names ("Claude Sonnet 4.5"): the billed names table maps them."""

    def line(self, row: dict) -> BilledLine:
        item = " / ".join(row[f].strip() for f in ("usage_type", "cost_type", "context_window", "inference_geo", "speed")
                          if (row.get(f) or "").strip())
        return BilledLine(day=_utc_day(row["usage_date_utc"]), model=(row.get("model") or "").strip().lower(),
                          project=(row.get("workspace") or "").strip(),
                          api_key=(row.get("api_key_id") or row.get("api_key") or "").strip(),
                          line_item=item, token_type=(row.get("token_type") or "").strip(),
                          service_tier=(row.get("service_tier") or "").strip(), amount=_decimal(row["cost_usd"]),
                          currency="USD")


CSV_KINDS = [  # most specific first
    OpenAIDashboardCsv(Source.OPENAI_DASHBOARD_CSV, frozenset({"start_time", "line_item", "amount_value"})),
    AnthropicConsoleCsv(Source.ANTHROPIC_CONSOLE_CSV, frozenset({"usage_date_utc", "model", "cost_usd"})),
    GenericCsv(Source.CSV, frozenset({"date", "model", "amount"})),
]


def _csv_kind(header: list[str]) -> CsvKind:
    columns = {column.strip().lower() for column in header}
    for kind in CSV_KINDS:
        if kind.required <= columns:
            return kind
    raise NotThisKind(f"a CSV whose columns ({', '.join(sorted(columns))[:200]}) are of no kind Tollgate reads")


def _csv_lines(kind: CsvKind, reader) -> Numbered:
    header = None
    for number, row in enumerate(reader, start=1):
        if header is None:
            header = [column.strip().lower() for column in row]
            continue
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield number, f"{len(row)} columns where the header has {len(header)}"
            continue
        try:
            line = kind.line(dict(zip(header, row)))
            if line is not None:
                yield number, line
        except (KeyError, ValueError, TypeError, OverflowError) as exc:
            yield number, f"{type(exc).__name__}: {exc}"


# --- opening a file ----------------------------------------------------------------------------------------

def open_lines(binary, *, expected: str = "") -> tuple[str, Numbered]:
    """The file's kind and its lines. `binary` is a file opened for reading bytes; CSVs are read a line at a
    time (any size), JSON documents whole (the APIs' pages: small). Raises NotThisKind."""
    head = binary.read(4096)
    binary.seek(0)
    text_head = head.lstrip(codecs.BOM_UTF8).lstrip()
    if text_head.startswith((b"{", b"[")):
        text = io.TextIOWrapper(binary, encoding="utf-8-sig")
        try:
            document = json.load(text)
        except (ValueError, RecursionError) as exc:
            raise NotThisKind(f"a file that is not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
        finally:
            text.detach()  # the caller's file stays open
        source = detect_json(document)
        _check_expected(source, expected)
        return source, _json_lines(source, document)
    text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="strict", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        raise NotThisKind("an empty file") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise NotThisKind(f"a file that is not UTF-8 CSV ({exc})") from None
    finally:
        text.detach()
    kind = _csv_kind(header)
    _check_expected(kind.source, expected)
    binary.seek(0)
    text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="strict", newline="")
    return kind.source, _guarded(_csv_lines(kind, csv.reader(text)))


def _guarded(lines: Numbered) -> Numbered:
    """A broken CSV (an over-long field, bad UTF-8) rejects the line where it breaks and ends the file."""
    number = 0
    try:
        for number, item in lines:
            yield number, item
    except (csv.Error, UnicodeDecodeError) as exc:
        yield number + 1, f"the file breaks here ({type(exc).__name__}: {str(exc)[:120]})"


def _check_expected(source: str, expected: str) -> None:
    if expected and expected != source:
        raise NotThisKind(f"an {Source(source).label} file, not an {Source(expected).label} file")


def accepts(source: str, provider_kind: str) -> bool:
    kinds = KINDS[source]
    return kinds is None or provider_kind in kinds

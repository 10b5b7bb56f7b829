"""Tollgate's one settings module. Every value comes from the environment (see README: Configuration);
a bad value fails at start with ImproperlyConfigured naming the variable."""
import base64
import hashlib
import ipaddress
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import environ
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(environ.Env().str("TOLLGATE_VAR_DIR", default=str(BASE_DIR / "var")))

env = environ.Env()


def _env(cast, name, **kwargs):
    """Read one variable; a value that does not parse names the variable in the error."""
    try:
        return getattr(env, cast)(name, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured(f"{name}: cannot read {env.str(name)!r} as {cast} ({exc})") from exc


DEBUG = _env("bool", "DEBUG", default=False)
# Tests and DEBUG runs may start without secrets; a production process may not.
TESTING = "pytest" in sys.modules
_DEV = DEBUG or TESTING

SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not _DEV:
        raise ImproperlyConfigured("SECRET_KEY: must be set when DEBUG is off")
    SECRET_KEY = "dev-only-insecure-secret-key-never-use-in-production-0123456789"

ALLOWED_HOSTS = _env("list", "ALLOWED_HOSTS", default=["*"] if _DEV else ["localhost", "127.0.0.1"])
CSRF_TRUSTED_ORIGINS = _env("list", "CSRF_TRUSTED_ORIGINS", default=[])
# Proxies (CIDRs) whose X-Forwarded-For is believed: the load balancer in front of the web tier. Only a peer
# in this list may name the client; the client is the nearest address in the header that is not one of them.
# Empty: the peer itself is the client (REMOTE_ADDR). Used by IP allowlists, the ledger and the audit trail.
TRUSTED_PROXIES = _env("list", "TRUSTED_PROXIES", default=[])
try:
    TRUSTED_PROXY_NETWORKS = [ipaddress.ip_network(cidr.strip(), strict=False) for cidr in TRUSTED_PROXIES if cidr.strip()]
except ValueError as exc:
    raise ImproperlyConfigured(f"TRUSTED_PROXIES: {exc}") from exc

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "mozilla_django_oidc",
    "import_export",
    "axes",
    "governance",
    "gateway",
    "keys",
    "budgets",
    "ledger",
]

MIDDLEWARE = [
    "governance.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "governance.console.FriendlyErrorsMiddleware",  # the console's 404/500 pages under DEBUG too (`make run`)
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",  # last: it turns a lockout into its answer
]

# Login throttling (django-axes): after TOLLGATE_LOGIN_FAILURE_LIMIT failures, a username, and separately an
# address, is locked out for TOLLGATE_LOGIN_LOCKOUT_MINUTES (the right password included); every lockout is
# audited; IT unlocks in the admin (Access attempts). The address is the client's (TRUSTED_PROXIES).
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = _env("int", "TOLLGATE_LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=_env("int", "TOLLGATE_LOGIN_LOCKOUT_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = ["ip_address", "username"]
AXES_CLIENT_IP_CALLABLE = "governance.context.client_ip_of_request"
AXES_RESET_ON_SUCCESS = True
AXES_VERBOSE = False

ROOT_URLCONF = "governance.urls"
WSGI_APPLICATION = "governance.wsgi.application"
AUTH_USER_MODEL = "governance.Person"
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"
# --- Single sign-on (OpenID Connect with mozilla-django-oidc; README: Single sign-on) ------------
# On when OIDC_RP_CLIENT_ID is set; off, nothing of it is wired and /oidc/ answers 404. The provider's
# endpoints come from TOLLGATE_OIDC_ISSUER's discovery document, read at the first login rather than at start
# (the relay must not depend on the identity provider being up), unless OIDC_OP_* name them.
OIDC_RP_CLIENT_ID = _env("str", "OIDC_RP_CLIENT_ID", default="")
TOLLGATE_SSO = bool(OIDC_RP_CLIENT_ID)
OIDC_RP_CLIENT_SECRET = _env("str", "OIDC_RP_CLIENT_SECRET", default="")
OIDC_RP_SIGN_ALGO = _env("str", "OIDC_RP_SIGN_ALGO", default="RS256")
OIDC_RP_SCOPES = _env("str", "OIDC_RP_SCOPES", default="openid email profile")
TOLLGATE_OIDC_ISSUER = _env("str", "TOLLGATE_OIDC_ISSUER", default="").rstrip("/")
OIDC_OP_AUTHORIZATION_ENDPOINT = _env("str", "OIDC_OP_AUTHORIZATION_ENDPOINT", default="")
OIDC_OP_TOKEN_ENDPOINT = _env("str", "OIDC_OP_TOKEN_ENDPOINT", default="")
OIDC_OP_USER_ENDPOINT = _env("str", "OIDC_OP_USER_ENDPOINT", default="")
OIDC_OP_JWKS_ENDPOINT = _env("str", "OIDC_OP_JWKS_ENDPOINT", default="")
OIDC_TIMEOUT = _env("float", "OIDC_TIMEOUT", default=10.0)  # the library's default is to wait forever
# A signed-in person passes through the provider again (silently) this often: groups and deactivation resync.
OIDC_RENEW_ID_TOKEN_EXPIRY_SECONDS = _env("int", "OIDC_RENEW_ID_TOKEN_EXPIRY_SECONDS", default=900)
OIDC_AUTHENTICATE_CLASS = "governance.sso.TollgateAuthenticationRequestView"
OIDC_CALLBACK_CLASS = "governance.sso.TollgateAuthenticationCallbackView"
LOGIN_REDIRECT_URL_FAILURE = "/accounts/login/?sso=failed"
# Identity-provider groups -> Tollgate: roles ("IT admin=tollgate-it,..."), teams by prefix ("team-platform"
# -> the team with slug "platform"); TOLLGATE_OIDC_ALLOWED_GROUPS (empty: anyone the provider signs in).
TOLLGATE_OIDC_GROUPS_CLAIM = _env("str", "TOLLGATE_OIDC_GROUPS_CLAIM", default="groups")
TOLLGATE_OIDC_TEAM_GROUP_PREFIX = _env("str", "TOLLGATE_OIDC_TEAM_GROUP_PREFIX", default="team-")
TOLLGATE_OIDC_ALLOWED_GROUPS = _env("list", "TOLLGATE_OIDC_ALLOWED_GROUPS", default=[])
TOLLGATE_OIDC_ACTIVE_CLAIM = _env("str", "TOLLGATE_OIDC_ACTIVE_CLAIM", default="active")  # false: deactivate
TOLLGATE_OIDC_LOCAL_LOGIN = _env("str", "TOLLGATE_OIDC_LOCAL_LOGIN", default="superusers")
if TOLLGATE_OIDC_LOCAL_LOGIN not in ("superusers", "all"):
    raise ImproperlyConfigured("TOLLGATE_OIDC_LOCAL_LOGIN: must be 'superusers' or 'all'")


def _oidc_role_groups(value: str) -> dict[str, str]:
    """"IT admin=tollgate-it,Finance=tollgate-finance" -> {"tollgate-it": "IT admin", ...} (group -> role)."""
    from governance import roles

    mapping = {}
    for pair in filter(None, (part.strip() for part in value.split(","))):
        role, _, group = (side.strip() for side in pair.partition("="))
        if role not in roles.ROLE_PERMISSIONS or not group:
            raise ImproperlyConfigured(f"TOLLGATE_OIDC_ROLE_GROUPS: {pair!r} is not 'role=group' with a role among "
                                       f"{', '.join(roles.ROLE_PERMISSIONS)}")
        mapping[group] = role
    return mapping


TOLLGATE_OIDC_ROLE_GROUPS = _oidc_role_groups(env.str("TOLLGATE_OIDC_ROLE_GROUPS", default=""))
if TOLLGATE_SSO:
    if not OIDC_RP_CLIENT_SECRET:
        raise ImproperlyConfigured("OIDC_RP_CLIENT_SECRET: must be set when OIDC_RP_CLIENT_ID is")
    if not OIDC_RP_SIGN_ALGO.startswith(("RS", "ES", "HS")):
        raise ImproperlyConfigured(f"OIDC_RP_SIGN_ALGO: {OIDC_RP_SIGN_ALGO!r} is not an RS*, ES* or HS* algorithm")
    _endpoints = {"OIDC_OP_AUTHORIZATION_ENDPOINT": OIDC_OP_AUTHORIZATION_ENDPOINT, "OIDC_OP_TOKEN_ENDPOINT":
                  OIDC_OP_TOKEN_ENDPOINT, "OIDC_OP_USER_ENDPOINT": OIDC_OP_USER_ENDPOINT}
    if not OIDC_RP_SIGN_ALGO.startswith("HS"):
        _endpoints["OIDC_OP_JWKS_ENDPOINT"] = OIDC_OP_JWKS_ENDPOINT
    for _name, _url in {"TOLLGATE_OIDC_ISSUER": TOLLGATE_OIDC_ISSUER, **_endpoints}.items():
        if _url and not _url.startswith(("https://", "http://")):
            raise ImproperlyConfigured(f"{_name}: {_url!r} is not an http(s) URL")
        if not _url and not TOLLGATE_OIDC_ISSUER and _name != "TOLLGATE_OIDC_ISSUER":
            raise ImproperlyConfigured(f"{_name}: must be set when TOLLGATE_OIDC_ISSUER is not")
    # The password form stays for break-glass superusers (TOLLGATE_OIDC_LOCAL_LOGIN=superusers) or for all.
    AUTHENTICATION_BACKENDS = [
        AUTHENTICATION_BACKENDS[0],  # axes first: a locked-out address is refused whichever way it signs in
        "governance.sso.BreakGlassModelBackend" if TOLLGATE_OIDC_LOCAL_LOGIN == "superusers"
        else "django.contrib.auth.backends.ModelBackend",
        "governance.sso.TollgateOIDCBackend",
    ]
    MIDDLEWARE = [*MIDDLEWARE, "governance.sso.TollgateSessionRefresh"]
# With DEBUG on, pages answer 404/500 with the console's pages; true brings back Django's debug pages.
TOLLGATE_DEBUG_PAGES = _env("bool", "TOLLGATE_DEBUG_PAGES", default=False)

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "governance.console.console",
            ],
        },
    },
]

# --- Data stores -------------------------------------------------------------------------------
DATABASES = {
    "default": _env("db_url", "DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'tollgate.sqlite3'}"),
}
DATABASES["default"].setdefault("CONN_MAX_AGE", _env("int", "DATABASE_CONN_MAX_AGE", default=60))
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DATABASE_POOL_MAX_SIZE = _env("int", "DATABASE_POOL_MAX_SIZE", default=0)
# How long a call waits for a pooled connection before the relay answers 503 `overloaded`.
DATABASE_POOL_TIMEOUT = _env("float", "DATABASE_POOL_TIMEOUT", default=3.0)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A database that does not answer must fail a call in seconds, not hang it for the kernel's TCP timeout.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", 5)
if DATABASE_POOL_MAX_SIZE and DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # psycopg's pool per process: calls borrow a connection for their reads and give it back before they
    # wait on a provider (gateway.relay.call), so a pool far smaller than the calls in flight serves them.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # reconnect_timeout: psycopg_pool retries a lost connection with a doubling delay (1, 2, 4, 8 s ...) for
    # this long, then gives up and opens a fresh one when a call next needs it. Its default (5 minutes) lets
    # that delay grow past half a minute during a long outage, and a process then waits it out after
    # PostgreSQL is back; 5 s bounds it.
    DATABASES["default"]["OPTIONS"]["pool"] = {"min_size": 2, "max_size": DATABASE_POOL_MAX_SIZE,
                                               "timeout": DATABASE_POOL_TIMEOUT, "reconnect_timeout": 5}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web, worker and beat processes read while one of them writes.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"transaction_mode": "IMMEDIATE", "timeout": 20, "init_command": "PRAGMA journal_mode=WAL;"}
    )
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    # Tests get a file too, as the real run has (WAL: readers never wait for the writer), not Django's
    # shared in-memory database, where one thread's write locks the table against every other thread.
    DATABASES["default"].setdefault("TEST", {}).setdefault("NAME", str(Path(DATABASES["default"]["NAME"]).with_suffix(".test.sqlite3")))
# The ledger writer's own connection (ledger.writer): one per process, never from the pool, so writing the
# ledger never waits behind the calls it records. Same database; tests see it as the default's mirror.
DATABASES["ledger"] = {
    **DATABASES["default"],
    "OPTIONS": {k: v for k, v in DATABASES["default"].get("OPTIONS", {}).items() if k != "pool"},
    "CONN_MAX_AGE": None,
    "TEST": {"MIRROR": "default"},
}
# The role that owns the schema, for the schema changes the running application makes (next months' ledger
# partitions, beat): in production the application's own role (DATABASE_URL) owns nothing, so it can neither
# TRUNCATE the audit trail nor switch its append-only trigger off (README: Security). Unset: DATABASE_URL's.
DATABASE_OWNER_URL = env.str("DATABASE_OWNER_URL", default="")
if DATABASE_OWNER_URL:
    DATABASES["owner"] = {**env.db_url_config(DATABASE_OWNER_URL), "CONN_MAX_AGE": 0, "TEST": {"MIRROR": "default"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="")
if not REDIS_URL and (VAR_DIR / "run.env").exists() and "DATABASE_URL" not in env:
    # `make run` is running on its embedded Redis (governance.cli writes run.env): a management command run
    # by hand beside it (revoke_key, ...) must tell the same Redis, or the running relay never hears of it.
    REDIS_URL = dict(line.split("=", 1) for line in (VAR_DIR / "run.env").read_text().splitlines()
                     if "=" in line).get("REDIS_URL", "")
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    # Shared by every process through the database: never a per-process cache.
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "tollgate_cache"}}

# --- Celery ------------------------------------------------------------------------------------
# How often the daily rollups (every report, reconciliation included, reads them) fold in new ledger rows.
TOLLGATE_ROLLUP_SECONDS = _env("int", "TOLLGATE_ROLLUP_SECONDS", default=60)
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = VAR_DIR / "broker"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
    for _folder in ("queue", "processed", "control"):
        (_broker_dir / _folder).mkdir(parents=True, exist_ok=True)
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_ALWAYS_EAGER = _env("bool", "CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE = {
    "purge-call-bodies": {"task": "ledger.tasks.purge_call_bodies", "schedule": 3600.0},
    "expire-keys-and-grants": {"task": "keys.tasks.expire_keys_and_grants", "schedule": 3600.0},
    "report-unused-keys": {"task": "keys.tasks.report_unused_keys", "schedule": 7 * 86400.0},
    "verify-grant-counters": {"task": "budgets.tasks.verify_grant_counters", "schedule": 3600.0},
    "deliver-pending-grant-alerts": {"task": "budgets.tasks.deliver_pending_grant_alerts", "schedule": 60.0},
    "forecast-grant-spend": {"task": "budgets.tasks.forecast_grant_spend", "schedule": 86400.0},
    "rollup-ledger": {"task": "ledger.tasks.rollup_ledger", "schedule": float(TOLLGATE_ROLLUP_SECONDS)},
    "maintain-ledger-partitions": {"task": "ledger.tasks.maintain_ledger_partitions", "schedule": 86400.0},
    "reconcile-last-month": {"task": "ledger.tasks.reconcile_last_month", "schedule": crontab(minute=0, hour=6, day_of_month=1)},
    "checkpoint-audit-head": {"task": "governance.tasks.checkpoint_audit_head", "schedule": crontab(minute=5, hour=0)},
    "detect-anomalies": {"task": "budgets.tasks.detect_anomalies", "schedule": 300.0},
}

# --- Internationalisation ----------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if _DEV
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

EMAIL_CONFIG = _env("email_url", "EMAIL_URL", default="consolemail://")
vars().update(EMAIL_CONFIG)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="tollgate@localhost")

# --- Security (check --deploy is clean when DEBUG is off) --------------------------------------
_SECURE = not _DEV
SECURE_SSL_REDIRECT = _env("bool", "SECURE_SSL_REDIRECT", default=_SECURE)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
SECURE_HSTS_SECONDS = _env("int", "SECURE_HSTS_SECONDS", default=31536000 if _SECURE else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _SECURE
SECURE_HSTS_PRELOAD = _SECURE
SESSION_COOKIE_SECURE = _env("bool", "SESSION_COOKIE_SECURE", default=_SECURE)
CSRF_COOKIE_SECURE = _env("bool", "CSRF_COOKIE_SECURE", default=_SECURE)
if _env("bool", "SECURE_PROXY_SSL_HEADER", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SILENCED_SYSTEM_CHECKS: list[str] = []

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

if TESTING:
    # Password hashing dominates test set-up time; tests never need a strong hash.
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "governance.api.authentication.ApiTokenAuthentication",  # Authorization: Bearer tg_api_...
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": [
        "rest_framework.permissions.IsAuthenticated",
        "governance.api.permissions.TokenScope",
        "governance.api.permissions.HasModelPerm",
    ],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "governance.api.pagination.StandardPagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "governance.api.errors.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Tollgate management API",
    "DESCRIPTION": "Keys, access requests, budgets, usage and chargeback. Authenticate with "
                   "`Authorization: Bearer tg_api_...` (an API token) or a browser session.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # The docs page's Swagger UI from the installed sidecar package, never a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "PREPROCESSING_HOOKS": ["governance.api.schema.only_management_api"],
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "UsageClassEnum": "governance.models.UsageClass",
        "KeyStatusEnum": "keys.models.VirtualKey.Status",
        "DecisionStatusEnum": "keys.models.AccessRequest.Status",  # increases share it
        "AccessRequestKindEnum": "keys.models.AccessRequest.Kind",
        "ApiTokenKindEnum": "keys.models.ApiToken.Kind",
        "GrantStatusEnum": "budgets.models.Grant.Status",
        "AlertStatusEnum": "budgets.models.Alert.Status",
        "AlertKindEnum": "budgets.models.Alert.Kind",
        "ProviderKindEnum": "gateway.models.Provider.Kind",
        "ModelKindEnum": "gateway.models.ModelAlias.Kind",
        "ReconciliationStatusEnum": "ledger.models.Reconciliation.Status",
        "CostImportStatusEnum": "ledger.models.ProviderCostImport.Status",
    },
}

# --- Tollgate ----------------------------------------------------------------------------------
TOLLGATE_CURRENCY = env.str("TOLLGATE_CURRENCY", default="USD")
TOLLGATE_BASE_URL = _env("str", "TOLLGATE_BASE_URL", default="http://localhost:8000").rstrip("/")  # absolute links in emails
TOLLGATE_KEY_ENVIRONMENT = env.str("TOLLGATE_KEY_ENVIRONMENT", default="l")
if TOLLGATE_KEY_ENVIRONMENT not in ("l", "t"):
    raise ImproperlyConfigured("TOLLGATE_KEY_ENVIRONMENT: must be 'l' (live) or 't' (test)")


# The relay
TOLLGATE_MAX_BODY_BYTES = _env("int", "TOLLGATE_MAX_BODY_BYTES", default=8 * 1024 * 1024)
# A relay body that has not fully arrived by then is refused (408 request_timeout) and frees its call slot.
TOLLGATE_BODY_READ_SECONDS = _env("float", "TOLLGATE_BODY_READ_SECONDS", default=30.0)
DATA_UPLOAD_MAX_MEMORY_SIZE = max(TOLLGATE_MAX_BODY_BYTES + 1, 2_621_440)
TOLLGATE_BODY_RETENTION_DAYS = _env("int", "TOLLGATE_BODY_RETENTION_DAYS", default=30)
# Keys, grants and the catalog in each process's memory are reloaded at once when a write bumps their
# stamp (governance.stamps); this is only the upper bound if a bump could not be published.
TOLLGATE_MEMORY_CACHE_SECONDS = _env("float", "TOLLGATE_MEMORY_CACHE_SECONDS", default=60.0)
TOLLGATE_KEY_CACHE_SIZE = _env("int", "TOLLGATE_KEY_CACHE_SIZE", default=5000)
# The ledger: each web process journals its calls here (ledger.journal) so a row the database cannot take
# now, or the call of a worker that died, is written later; on a persistent volume in production.
TOLLGATE_SPOOL_DIR = Path(env.str("TOLLGATE_SPOOL_DIR", default=str(VAR_DIR / "spool")))
# How long a call waits for its ledger row to commit before it relies on the journal (fsynced) and answers.
TOLLGATE_LEDGER_WAIT_SECONDS = _env("float", "TOLLGATE_LEDGER_WAIT_SECONDS", default=2.0)
# Budgets
TOLLGATE_HOLD_SECONDS = _env("int", "TOLLGATE_HOLD_SECONDS", default=900)
# Reconciliation: a day x model line (and a month) drifts when both thresholds are passed.
TOLLGATE_RECONCILE_DRIFT_ABS = Decimal(_env("str", "TOLLGATE_RECONCILE_DRIFT_ABS", default="1.00"))
TOLLGATE_RECONCILE_DRIFT_PCT = Decimal(_env("str", "TOLLGATE_RECONCILE_DRIFT_PCT", default="2"))
# Provider cost files: uploads above this are refused; accepted ones are stored here (shared by web and
# worker: a volume in docker-compose) and read by the worker.
TOLLGATE_COST_IMPORT_MAX_BYTES = _env("int", "TOLLGATE_COST_IMPORT_MAX_BYTES", default=200 * 1024 * 1024)
# Outgoing webhooks (governance.webhooks): each POST waits this long; a delivery is tried this many times,
# with exponential backoff from 30 s, before it is marked failed.
TOLLGATE_WEBHOOK_TIMEOUT_SECONDS = _env("float", "TOLLGATE_WEBHOOK_TIMEOUT_SECONDS", default=5.0)
TOLLGATE_WEBHOOK_MAX_ATTEMPTS = _env("int", "TOLLGATE_WEBHOOK_MAX_ATTEMPTS", default=8)
if TOLLGATE_WEBHOOK_MAX_ATTEMPTS < 1:
    raise ImproperlyConfigured("TOLLGATE_WEBHOOK_MAX_ATTEMPTS: must be at least 1")
MEDIA_ROOT = Path(env.str("TOLLGATE_MEDIA_DIR", default=str(VAR_DIR / "media")))
TOLLGATE_GRANT_AUTO_INCREASE = Decimal(_env("str", "TOLLGATE_GRANT_AUTO_INCREASE", default="100"))
# Anomaly detection (budgets.anomalies, beat every 5 minutes): each key, person and team's last window against
# the mean window of the baseline hours before it.
TOLLGATE_ANOMALY_WINDOW_MINUTES = _env("int", "TOLLGATE_ANOMALY_WINDOW_MINUTES", default=5)
TOLLGATE_ANOMALY_BASELINE_HOURS = _env("int", "TOLLGATE_ANOMALY_BASELINE_HOURS", default=24)
TOLLGATE_ANOMALY_RATE_FACTOR = Decimal(_env("str", "TOLLGATE_ANOMALY_RATE_FACTOR", default="5"))
# Floors, so a key going from 1 call to 5 (or from 0.01 to 0.05) is not an alert.
TOLLGATE_ANOMALY_MIN_CALLS = _env("int", "TOLLGATE_ANOMALY_MIN_CALLS", default=30)
TOLLGATE_ANOMALY_MIN_SPEND = Decimal(_env("str", "TOLLGATE_ANOMALY_MIN_SPEND", default="1.00"))
TOLLGATE_ANOMALY_CALL_COST = Decimal(_env("str", "TOLLGATE_ANOMALY_CALL_COST", default="5.00"))
TOLLGATE_ANOMALY_PREMIUM_MIN_CALLS = _env("int", "TOLLGATE_ANOMALY_PREMIUM_MIN_CALLS", default=5)
# "experimentation": a rate or spend alert on an experimentation key suspends it (reversible from the alert); "off".
TOLLGATE_ANOMALY_SUSPEND = _env("str", "TOLLGATE_ANOMALY_SUSPEND", default="experimentation")
if TOLLGATE_ANOMALY_SUSPEND not in ("off", "experimentation"):
    raise ImproperlyConfigured("TOLLGATE_ANOMALY_SUSPEND: must be 'off' or 'experimentation'")
if TOLLGATE_ANOMALY_WINDOW_MINUTES < 1 or TOLLGATE_ANOMALY_BASELINE_HOURS * 60 < 2 * TOLLGATE_ANOMALY_WINDOW_MINUTES:
    raise ImproperlyConfigured("TOLLGATE_ANOMALY_WINDOW_MINUTES: must be at least 1 and at most half the baseline")
# Anomaly alerts are also POSTed here as JSON (Slack-compatible "text" included); empty: no webhook.
TOLLGATE_ALERT_WEBHOOK_URL = _env("str", "TOLLGATE_ALERT_WEBHOOK_URL", default="")


def _dev_encryption_key(secret: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(("fernet:" + secret).encode()).digest()).decode()


# Comma-separated Fernet keys; the first encrypts, all decrypt (see `manage.py rotate_encryption_keys`).
TOLLGATE_ENCRYPTION_KEYS = _env("list", "TOLLGATE_ENCRYPTION_KEYS", default=[])
# The audit chain's HMAC key: never stored in the database (default: derived from SECRET_KEY). Changing it
# makes earlier events fail verification: keep the old one to verify them (see README: Security).
TOLLGATE_AUDIT_KEY = env.str("TOLLGATE_AUDIT_KEY", default="")
# Where the daily signed checkpoint of the audit head is appended (keep it where the database's users cannot write).
TOLLGATE_AUDIT_CHECKPOINT_FILE = Path(env.str("TOLLGATE_AUDIT_CHECKPOINT_FILE", default=str(BASE_DIR / "var" / "audit-checkpoints.jsonl")))
if not TOLLGATE_ENCRYPTION_KEYS:
    if not _DEV:
        raise ImproperlyConfigured("TOLLGATE_ENCRYPTION_KEYS: must be set when DEBUG is off")
    TOLLGATE_ENCRYPTION_KEYS = [_dev_encryption_key(SECRET_KEY)]

# --- Logging: JSON lines with the request id; secrets are redacted by a filter ------------------
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").upper()
LOG_FORMAT = env.str("LOG_FORMAT", default="json")
if LOG_FORMAT not in ("json", "text"):
    raise ImproperlyConfigured("LOG_FORMAT: must be 'json' or 'text'")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "request_id": {"()": "governance.logging.RequestIdFilter"},
        "redact": {"()": "governance.logging.RedactSecretsFilter"},
    },
    "formatters": {
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
        "text": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_id", "redact"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        "axes": {"level": "WARNING"},  # lockouts are audited; its per-login INFO lines are noise
    },
}

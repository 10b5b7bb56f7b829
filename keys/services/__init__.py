"""Every write to keys and access requests goes through these functions (admin, pages, CLI, tasks alike)."""
from keys.services.lifecycle import (
    IssuedKey,
    KeyStateError,
    SweepResult,
    key_extend,
    key_issue,
    key_reactivate,
    key_revoke,
    key_rotate,
    key_suspend,
    keys_expire_sweep,
)
from keys.services.policy import PolicyNotAccepted, aup_accept, aup_pending_for, aup_publish, aup_require
from keys.services.requests import (
    RequestRefused,
    Submitted,
    approvers_of,
    request_approve,
    request_change,
    request_collect,
    request_deny,
    request_submit,
)

__all__ = [
    "IssuedKey", "KeyStateError", "PolicyNotAccepted", "RequestRefused", "Submitted", "SweepResult", "approvers_of",
    "key_extend", "key_issue", "key_reactivate", "key_revoke", "key_rotate", "key_suspend", "keys_expire_sweep",
    "aup_accept", "aup_pending_for", "aup_publish", "aup_require",
    "request_approve", "request_change", "request_collect", "request_deny", "request_submit",
]

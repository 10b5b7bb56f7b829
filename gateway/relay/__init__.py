"""The relay: one client call through identity, policy, limits and budget to a provider and back.

Checks run in the order the API promises (key, source IP, request, model, rate limits, budget), each
refusal with its own code; every call, refused or served, ends in exactly one ledger entry.

    checks.py  each check, in order        wire.py  provider and client formats, streams
    call.py    the call: forward, fall back, settle, record
"""
from gateway.relay.call import RelayResult, handle, refuse_unrouted
from gateway.relay.checks import CHAT, EMBEDDINGS, MESSAGES, MODELS, RelayCall

__all__ = ["CHAT", "EMBEDDINGS", "MESSAGES", "MODELS", "RelayCall", "RelayResult", "handle", "refuse_unrouted"]

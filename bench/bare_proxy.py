"""A proxy that does nothing but forward: the floor under the relay's added latency on this machine.

bench/relay.py runs it on the same gunicorn set-up as the relay (`governance.gunicorn_conf`: worker class,
workers) and sends it the same paced calls. It reads the body, POSTs it to BARE_PROXY_UPSTREAM through one
pooled `requests` session (as gateway.providers does) and returns the upstream's bytes: no Django, no key,
no checks, no Redis, no ledger. What it adds over calling the stub directly is what one more HTTP hop
through a Python server costs here; the relay's figure minus this one is Tollgate's own work.
"""
import os

import requests

_session = requests.Session()
_session.trust_env = False
_upstream = os.environ.get("BARE_PROXY_UPSTREAM", "")


def application(environ, start_response):
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    upstream = _session.post(_upstream, data=body, timeout=(5, 30), headers={
        "Content-Type": "application/json", "Authorization": "Bearer sk-bench"})
    start_response(f"{upstream.status_code} {upstream.reason}", [
        ("Content-Type", upstream.headers.get("Content-Type", "application/json")),
        ("Content-Length", str(len(upstream.content)))])
    return [upstream.content]

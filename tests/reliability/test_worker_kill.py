"""Reproduction: a web worker killed (SIGKILL) while it relays streams. The production web tier (gunicorn,
two gevent workers) relays `drip-5` streams (each spread over 5 s), started one by one until there are ten
and each worker holds at least two (at most 24); with every client past its first chunk, the worker holding
the most of them is killed. gunicorn starts a replacement. The calls the dead worker had in flight must each
get exactly one ledger row (outcome upstream_error, error_code worker_lost), written from the journal it
left in TOLLGATE_SPOOL_DIR; the other worker's calls finish and are ledgered `ok`, each exactly once."""
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from tests.reliability.harness import HELLO, Call, request_id, sdk

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

STREAMS = 10
MAX_STREAMS = 24
UPSTREAM = "drip-5"


@dataclass
class Stream:
    call: Call
    first_chunk: threading.Event
    client_port: int | None = None
    text: str = ""
    complete: bool = False


def relay_stream(tier, secret: str, stream: Stream) -> None:
    """One streamed call on its own SDK client (its own connection): note the local port, signal the first
    chunk, read to the end; a stream cut short leaves `complete` False and the exception in `failure`."""
    call, client = stream.call, sdk(tier.v1, secret)
    try:
        response = client.chat.completions.create(
            model="drip", messages=HELLO, stream=True, stream_options={"include_usage": True},
            extra_headers={"X-Request-ID": call.request_id})
        network = response.response.extensions.get("network_stream")
        stream.client_port = network.get_extra_info("client_addr")[1] if network is not None else None
        for chunk in response:
            stream.first_chunk.set()
            if chunk.choices:
                stream.text += chunk.choices[0].delta.content or ""
        stream.complete, call.status = True, 200
    except Exception as exc:  # the worker died under it: reset connection, incomplete chunked body, ...
        call.failure = type(exc).__name__
    finally:
        call.elapsed = time.monotonic() - call.started
        stream.first_chunk.set()
        client.close()


def test_calls_in_flight_on_a_killed_worker_are_ledgered_once_as_worker_lost(relay, web_tier, key, ledger_count):
    relay.alias("drip", (relay.openai_provider, UPSTREAM))
    tier = web_tier(workers=2, DATABASE_POOL_MAX_SIZE=8, DATABASE_POOL_TIMEOUT=2)
    workers_before = tier.workers()

    # Streams start one after another, each on a new connection, until there are STREAMS of them and each
    # worker holds at least two (which worker accepts a connection is the kernel's choice), or MAX_STREAMS.
    streams, threads, on_worker = [], [], {}
    while len(streams) < MAX_STREAMS:
        stream = Stream(Call(request_id(f"kill{len(streams)}"), started=time.monotonic()), threading.Event())
        thread = threading.Thread(target=relay_stream, args=(tier, key.secret, stream), daemon=True)
        streams.append(stream)
        threads.append(thread)
        thread.start()
        if not stream.first_chunk.wait(10) or stream.call.failure:
            break  # reported just below
        in_flight = tier.connections_by_worker()  # client port -> worker pid
        on_worker = {s.call.request_id: in_flight.get(s.client_port) for s in streams}
        held = Counter(on_worker.values())
        if len(streams) >= STREAMS and all(held[pid] >= 2 for pid in workers_before):
            break
    harness = [f"{s.call.request_id}: not in flight ({s.call.failure or ('complete' if s.complete else 'no first chunk')})"
               for s in streams if s.complete or s.call.failure or not s.first_chunk.is_set()]
    harness += [f"{rid}: its connection is held by no worker" for rid, pid in on_worker.items() if pid is None]
    assert not harness, ("harness: the streams were not all in flight before the kill\n" + "\n".join(harness) + "\n"
                         + tier.log_tail())

    per_worker = Counter(on_worker.values())
    victim = per_worker.most_common(1)[0][0]
    killed = {rid for rid, pid in on_worker.items() if pid == victim}
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    replacement = tier.wait_for_workers(2, not_in=[victim])  # raises if gunicorn does not replace it in 20s
    replaced_in = time.monotonic() - killed_at
    for thread in threads:
        thread.join(timeout=20)
    count = ledger_count([s.call.request_id for s in streams], timeout=15)

    print(f"\n[worker kill] {len(streams)} streams on workers {dict(per_worker)}; killed {victim} holding {len(killed)}, "
          f"replaced by {sorted(set(replacement) - set(workers_before))} in {replaced_in:.1f}s")
    print(f"[worker kill] clients: {sum(s.complete for s in streams)} complete, "
          f"broken {dict(Counter(s.call.failure for s in streams if not s.complete))}; "
          f"longest {max(s.call.elapsed for s in streams):.1f}s")
    print(f"[worker kill] ledger: {count.summary()}")

    problems = count.problems()
    for s in streams:
        rid, rows = s.call.request_id, count.by_id.get(s.call.request_id, [])
        if len(rows) != 1:
            continue  # counted above
        row = rows[0]
        if rid in killed:
            if (row["outcome"], row["error_code"]) != ("upstream_error", "worker_lost"):
                problems.append(f"{rid} (killed worker): ledgered {row['outcome']}/{row['error_code']}, "
                                "not upstream_error/worker_lost")
            if s.complete:
                problems.append(f"{rid} (killed worker): its client read a complete stream (the kill missed it)")
        else:
            if not s.complete:
                problems.append(f"{rid} (surviving worker): stream broken ({s.call.failure})")
            if (row["outcome"], row["http_status"]) != ("ok", 200):
                problems.append(f"{rid} (surviving worker): ledgered "
                                f"{row['outcome']}/{row['http_status']}/{row['error_code']}, not ok/200")
    assert not problems, "\n".join(problems) + "\n" + tier.log_tail()

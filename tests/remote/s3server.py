"""moto's S3 server on loopback for the remote tests: ``python s3server.py PORT [--record FILE] [--auth-after N]``.

Prints ``ready`` once it answers. ``--auth-after N``: the first N requests (the tests' setup: IAM users,
policies, keys, the bucket) run unauthenticated, every later one needs a valid signature and an IAM policy
that allows it (moto's access control), so read-only credentials are really read-only.

``--record FILE``: every mutating request is appended to FILE and replayed at start, so a killed server
restarted with the same FILE comes back with its buckets and objects, as a real object store does. moto's
recorder appends from every request thread without a lock (a large PUT interleaves with others and corrupts
the file), hence the lock here; reads are not recorded (they change nothing and would bloat the replay).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import urllib.request

parser = argparse.ArgumentParser()
parser.add_argument("port", type=int)
parser.add_argument("--record")
parser.add_argument("--auth-after", type=int)
args = parser.parse_args()

if args.auth_after is not None:
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = str(args.auth_after)
if args.record:
    os.environ["MOTO_ENABLE_RECORDING"] = "1"
    os.environ["MOTO_RECORDER_FILEPATH"] = args.record

import moto.moto_api._internal.recorder.models as recorder  # noqa: E402
from moto.moto_server.threaded_moto_server import ThreadedMotoServer  # noqa: E402

_record = recorder.Recorder._record_request
_lock = threading.Lock()


def _locked_record(self, request, body=None):
    if request.method in ("GET", "HEAD"):
        return
    with _lock:
        _record(self, request, body)


recorder.Recorder._record_request = _locked_record

server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
server.start()
base = f"http://127.0.0.1:{args.port}"
for _ in range(100):
    try:
        urllib.request.urlopen(base + "/moto-api/", timeout=2).read()
        break
    except OSError:
        time.sleep(0.05)
if args.record and os.path.exists(args.record) and os.path.getsize(args.record):
    urllib.request.urlopen(urllib.request.Request(base + "/moto-api/recorder/replay-recording", method="POST"),
                           timeout=600).read()
print("ready", flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(3600)

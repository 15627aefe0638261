"""common/claims.py's S3 claims (moto's S3 server on 127.0.0.1): a holder that died on this
machine is taken over at once, not after --claim_timeout; a live one, one reused pid's new
process aside, and one on another machine are left alone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from common import claims, storage

HOLDER = """
import sys, time
from common.claims import claim_for
c = claim_for(sys.argv[1], "shard", timeout=float(sys.argv[2]))
assert c.try_acquire()
print("held", flush=True)
time.sleep(600)
"""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_holder(url: str, timeout: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url, str(timeout)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_holder_killed_on_this_host_is_taken_over_at_once(s3_bucket, capsys):
    """kill -9 of a run, then the same command at once: the claim object still has a fresh
    heartbeat (--claim_timeout 600 s), but its pid is gone from this machine."""
    url = f"s3://{s3_bucket}/out/00000.parquet"
    proc = start_holder(url, 600.0)
    rerun = claims.claim_for(url, "shard", timeout=600.0)
    assert not rerun.free() and not rerun.try_acquire()  # alive: left to it
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    record, _ = rerun.read()
    assert record["pid"] == proc.pid and time.time() - record["heartbeat"] < 600  # not stale by its age
    assert rerun.free() and rerun.try_acquire()
    assert rerun.read()[0]["token"] == rerun.token
    out = capsys.readouterr().out
    assert f"process {proc.pid}" in out and "no longer running on this host" in out
    rerun.release()


def put_record(url: str, **changes) -> None:
    """A claim object as a holder on this machine writes it, with fields changed."""
    mine = claims.S3Claim(url + claims.CLAIM_SUFFIX, 600.0)
    record = json.loads(mine._body())
    record.update(changes)
    storage.write_bytes(url + claims.CLAIM_SUFFIX, json.dumps(record).encode())


def test_only_a_dead_holder_of_this_machine_is_taken_over_early(s3_bucket):
    url = f"s3://{s3_bucket}/out/00001.parquet"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that is not running (reuse within this test aside)
    taker = claims.S3Claim(url + claims.CLAIM_SUFFIX, 600.0)
    cases = {  # changes to a fresh record of this machine -> taken over at once?
        "live holder (this process)": ({}, False),
        "pid reused by a process started at another time": ({"started": "1"}, True),
        "dead pid on another host": ({"pid": gone.pid, "host": "elsewhere"}, False),
        "dead pid under another boot of the host": ({"pid": gone.pid, "boot_id": "another-boot"}, False),
        "dead pid in another pid namespace (a container)": ({"pid": gone.pid, "pid_ns": "pid:[1]"}, False),
        "dead pid, claim by a version that recorded no boot": ({"pid": gone.pid, "boot_id": None}, False),
        "dead pid on this machine": ({"pid": gone.pid}, True),
    }
    for what, (changes, taken) in cases.items():
        put_record(url, **changes)
        assert taker.free() is taken, what
        assert taker.try_acquire() is taken, what
        if taken:
            taker.release()

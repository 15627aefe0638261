"""common/storage.py and common/claims.py against moto's S3 server on 127.0.0.1 (and local disk)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import boto3
import botocore
import pytest

from common import claims, storage
from testkit.s3server import forget_filesystems


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """A folder as a local path or as an s3:// prefix."""
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/laion/out"


def test_write_read_list_expand(where):
    if not storage.is_url(where):
        os.makedirs(where)
    a, b = storage.join(where, "00000.parquet"), storage.join(where, "00002.parquet")
    storage.write_bytes(a, b"first")
    storage.write_json(b, {"n": 2})
    storage.write_bytes(a, b"replaced")  # a whole replace, never an append
    assert storage.read_bytes(a) == b"replaced" and storage.read_json(b) == {"n": 2}
    assert storage.size(a) == len(b"replaced")
    with storage.open_read(a) as f:
        assert f.read(3) == b"rep" and f.read() == b"laced"
    found, missing = storage.expand(storage.join(where, "{00000..00003}.parquet"))
    assert found == [a, b] and missing == [storage.join(where, "00001.parquet"), storage.join(where, "00003.parquet")]
    assert storage.list_names(where) == ["00000.parquet", "00002.parquet"]
    storage.remove(a)
    storage.remove(a)  # already gone: fine
    assert not storage.exists(a) and storage.exists(b)
    with pytest.raises(storage.NotFound, match="00000.parquet"):
        storage.read_bytes(a)


def test_failed_upload_leaves_no_object(s3_bucket):
    url = f"s3://{s3_bucket}/out/00000.parquet"

    def write_half(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        storage.write_atomic(url, write_half)
    assert not storage.exists(url)


def test_server_honours_if_none_match(s3_server, s3_bucket):
    """S3 conditional PUT as AWS documents it: a second create-if-absent gets 412."""
    c = s3_server.client()
    c.put_object(Bucket=s3_bucket, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        c.put_object(Bucket=s3_bucket, Key="k", Body=b"2", IfNoneMatch="*")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert c.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"1"
    claims.check_atomic_create(f"s3://{s3_bucket}/out")  # the run's own probe passes
    assert storage.list_names(f"s3://{s3_bucket}/out") == []  # and cleans up after itself


def test_server_without_conditional_put_is_refused(s3_bucket, monkeypatch):
    """A server that lets a second create through (no If-None-Match support) is never trusted."""
    monkeypatch.setattr(claims.S3Claim, "_put", lambda self, **condition: True)
    with pytest.raises(claims.ClaimsUnsupported, match="does not implement conditional PUT"):
        claims.check_atomic_create(f"s3://{s3_bucket}/other")


def test_backend_without_atomic_create_is_refused():
    with pytest.raises(claims.ClaimsUnsupported, match=r"memory://mem/out/00000.parquet: memory:// has no atomic"):
        claims.claim_for("memory://mem/out/00000.parquet", "shard")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_concurrent_claimers_one_wins(kind, tmp_path, request):
    """Eight threads race for each of three claims: exactly one wins each; after release, one again."""
    if kind == "s3":
        where = f"s3://{request.getfixturevalue('s3_bucket')}/out"
    else:
        where = str(tmp_path)
    for shard in range(3):
        target = storage.join(where, f"{shard:05d}.parquet")
        rivals = [claims.claim_for(target, "shard", timeout=60) for _ in range(8)]
        won: list = []
        start = threading.Barrier(len(rivals))

        def race(c) -> None:
            start.wait()
            if c.try_acquire():
                won.append(c)

        threads = [threading.Thread(target=race, args=(c,)) for c in rivals]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(won) == 1, f"shard {shard}: {len(won)} holders"
        won[0].check()
        won[0].release()
        again = claims.claim_for(target, "shard", timeout=60)
        assert again.try_acquire()
        again.release()


HOLDER = """
import sys, time
from common.claims import claim_for
c = claim_for(sys.argv[1], "shard", timeout=float(sys.argv[2]))
assert c.try_acquire()
print("held", flush=True)
time.sleep(120)
"""


def start_holder(url: str, timeout: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url, str(timeout)], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_stale_claim_taken_over_once(s3_bucket):
    """A holder killed with -9 stops its heartbeat; after --claim_timeout one of two concurrent
    takers gets the claim, the other does not; a live holder is never taken over."""
    url = f"s3://{s3_bucket}/out/00000.parquet"
    timeout = 2.0
    proc = start_holder(url, timeout)
    try:
        live = claims.claim_for(url, "shard", timeout=60.0)  # longer than any stall of a loaded machine
        first, last, end = live.read()[0]["heartbeat"], 0.0, time.monotonic() + 300
        while last < first + 2.5 * timeout:  # the holder refreshes every timeout/4: watch it go on
            record, _ = live.read()
            assert record["pid"] == proc.pid and proc.poll() is None and time.monotonic() < end
            last = record["heartbeat"]
            assert not live.try_acquire(), "took over a live holder's claim"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(timeout + 0.5)
    takers = [claims.claim_for(url, "shard", timeout=timeout) for _ in range(2)]
    won: list = []
    start = threading.Barrier(2)

    def take(c) -> None:
        start.wait()
        if c.try_acquire():
            won.append(c)

    threads = [threading.Thread(target=take, args=(c,)) for c in takers]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(won) == 1
    record, _ = won[0].read()
    assert record["pid"] == os.getpid() and record["token"] == won[0].token
    won[0].release()


def test_holder_that_lost_its_claim_stops(s3_bucket):
    """A holder stalled beyond the timeout finds at its next check that the claim was taken."""
    url = f"s3://{s3_bucket}/out/00001.parquet"
    stalled = claims.claim_for(url, "shard", timeout=600.0)  # its first refresh would come after 150 s
    assert stalled.try_acquire()
    stalled._stop.set()  # its heartbeat thread stops, as in a process that hangs
    time.sleep(0.2)
    taker = claims.claim_for(url, "shard", timeout=0.1)  # the heartbeat is at least 0.2 s old: stale to it
    assert taker.try_acquire()
    with pytest.raises(claims.ClaimLost, match="took this claim over"):
        stalled.check()
    stalled.release()  # must not delete the taker's claim
    assert storage.exists(url + ".claim")
    taker.check()
    taker.release()
    assert not storage.exists(url + ".claim")


# ---------------------------------------------------------------- bad input: one line naming the URL
def test_missing_bucket_named(s3_server):
    with pytest.raises(storage.StorageError, match=r"^list: s3://no-such-bucket-here/laion: the bucket "
                                                   r"'no-such-bucket-here' does not exist"):
        storage.list_names("s3://no-such-bucket-here/laion")


def test_missing_credentials_named(s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    forget_filesystems()
    try:
        with pytest.raises(storage.StorageError, match=f"s3://{s3_bucket}/x: no credentials for s3://") as e:
            storage.read_bytes(f"s3://{s3_bucket}/x")
        assert "\n" not in str(e.value)
    finally:
        forget_filesystems()


def test_access_denied_named(s3_server, s3_bucket, monkeypatch):
    """moto checks IAM: a user with no policy gets 403, reported as access denied."""
    storage.write_bytes(f"s3://{s3_bucket}/laion/00000.tar", b"x")
    keys = s3_server.user_without_permissions()
    for k, v in keys.items():
        monkeypatch.setenv(k, v)
    forget_filesystems()
    s3_server.require_auth(True)
    try:
        with pytest.raises(storage.StorageError, match=f"s3://{s3_bucket}/laion/00000.tar: access denied"):
            storage.read_bytes(f"s3://{s3_bucket}/laion/00000.tar")
    finally:
        s3_server.require_auth(False)
        forget_filesystems()


def test_transient_errors_retried_then_stop(monkeypatch):
    """Retries are bounded; the stop names the URL and says that it gave up."""
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    tries = []

    def flaky() -> bytes:
        tries.append(1)
        if len(tries) < storage.RETRIES:
            raise ConnectionResetError("connection reset by peer")
        return b"ok"

    assert storage.call("read", "s3://b/k", flaky) == b"ok" and len(tries) == storage.RETRIES
    with pytest.raises(storage.StorageError, match=r"read: s3://b/k: .*gave up after 3 tries"):
        storage.call("read", "s3://b/k", lambda: (_ for _ in ()).throw(TimeoutError("timed out")))


def test_unreachable_server_stops_with_url(monkeypatch, s3_bucket):
    """A server that went away (connection refused on a real socket) stops, naming the URL."""
    from testkit.net import free_port
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    forget_filesystems()
    try:
        with pytest.raises(storage.StorageError, match=f"s3://{s3_bucket}/laion/00000.tar: .*gave up after"):
            storage.read_bytes(f"s3://{s3_bucket}/laion/00000.tar")
    finally:
        forget_filesystems()


def test_a_retried_create_that_already_landed_is_ours(s3_bucket):
    """A PUT that succeeded but whose answer was lost is retried and gets 412 from its own
    write: the claim's token says it is ours, so the shard is not left waiting for a timeout."""
    c = claims.claim_for(f"s3://{s3_bucket}/out/00003.parquet", "shard", timeout=60)
    assert c._put(IfNoneMatch="*")  # the first try, landed
    other = claims.claim_for(f"s3://{s3_bucket}/out/00003.parquet", "shard", timeout=60)
    assert not other.try_acquire()
    assert c.try_acquire()  # the retry: 412, but the token is c's
    c.check()
    c.release()
    assert not storage.exists(f"s3://{s3_bucket}/out/00003.parquet.claim")


def test_missing_object_in_a_bucket_named_bucket_is_not_a_missing_bucket(s3_server):
    bucket = s3_server.new_bucket("my-bucket")
    with pytest.raises(storage.NotFound, match=f"^read: s3://{bucket}/laion/00403.tar: not found$"):
        storage.read_bytes(f"s3://{bucket}/laion/00403.tar")

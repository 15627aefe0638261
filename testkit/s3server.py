"""A real S3 HTTP API on 127.0.0.1 for tests and benchmarks: moto's server, in-process.

Clients reach it exactly as they reach AWS: the endpoint comes from AWS_ENDPOINT_URL (read
by botocore, so s3fs, boto3 and child processes such as torchrun's ranks all find it), the
credentials are fake and come from the environment. The environment also switches off every
way botocore could look beyond the loopback server (the EC2 metadata service, the user's
~/.aws files and profiles).
"""
from __future__ import annotations

import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from testkit.net import free_port

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
           "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    # (method, path, query) of every request the in-process server answered, in order (tests and
    # benchmarks count start-up requests with it; a child-process server records none)
    requests: list = field(default_factory=list, compare=False, repr=False)

    def count_since(self, mark: int, bucket: str = "") -> int:
        """Requests answered since len(requests) was `mark` (to `bucket` only, when given)."""
        return sum(1 for _, path, _ in self.requests[mark:] if not bucket or path.lstrip("/").startswith(bucket))

    def env(self) -> dict:
        """What a client process needs in its environment to use this server."""
        return {**FAKE_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_bucket(self, prefix: str = "laclip") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def require_auth(self, on: bool) -> None:
        """Make the server check credentials and IAM permissions (moto's reset-auth switch), or stop."""
        import urllib.request
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf",
                                     method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).close()

    def user_without_permissions(self) -> dict:
        """Access keys of a new IAM user with no policy: every S3 request it signs gets 403."""
        import boto3
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        name = f"nobody-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def upload_folder(folder: str, url: str) -> list[str]:
    """Copy every file of a local folder to the prefix `url` (one object each); returns the URLs."""
    from common import storage
    urls = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(url, name), f.read())
            urls.append(storage.join(url, name))
    return urls


def forget_filesystems() -> None:
    """fsspec caches filesystem objects (with their endpoint): drop them when the env changes."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def running_s3_server(own_process: bool = False) -> Iterator[S3Server]:
    """Start moto's server on a free loopback port, point the environment at it, and undo
    both on exit. own_process: run it as a child process (benchmarks: the server then does not
    share this process's interpreter lock with the code being measured)."""
    port = free_port()
    requests: list = []
    stop = _start_thread(port, requests) if not own_process else _start_process(port)
    s3 = S3Server(f"http://127.0.0.1:{port}", requests)
    saved = {k: os.environ.get(k) for k in (*s3.env(), *CLEARED)}
    for k in CLEARED:
        os.environ.pop(k, None)
    os.environ.update(s3.env())
    forget_filesystems()
    try:
        yield s3
    finally:
        stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        forget_filesystems()


def _start_thread(port: int, requests: list):
    """moto's server app on a werkzeug thread server (as moto's ThreadedMotoServer runs it), each
    request recorded in `requests` first."""
    import threading
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    app = DomainDispatcherApplication(create_backend_app)

    def recorded(environ, start_response):
        requests.append((environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", ""),
                         environ.get("QUERY_STRING", "")))  # list.append: atomic across threads
        return app(environ, start_response)

    server = make_server("127.0.0.1", port, recorded, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        thread.join()

    return stop


def _start_process(port: int):
    import socket
    import subprocess
    import sys
    import time
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto's server did not start on 127.0.0.1:{port}")
            time.sleep(0.1)

    def stop() -> None:
        proc.terminate()
        proc.wait(timeout=30)

    return stop

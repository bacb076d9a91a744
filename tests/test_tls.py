"""TLS on the public listener (server.tls): real certificates made with openssl for each test,
curl and Python's ssl module as clients, a real upstream behind."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import Origin, make_config, write_config

from sidecar.config import ConfigError, load_config


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN={name}", cwd=directory)
    return directory / f"{name}.pem", directory / f"{name}.key"


def make_cert(directory: Path, name: str, ca: str, *, host: str = "localhost"
              ) -> tuple[Path, Path]:
    """A certificate for `host` (and 127.0.0.1) signed by the CA `ca`."""
    (directory / f"{name}.ext").write_text(
        f"subjectAltName=DNS:{host},IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
            cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
            cwd=directory)
    return directory / f"{name}.pem", directory / f"{name}.key"


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    make_ca(tmp_path, "ca")
    make_cert(tmp_path, "server", "ca")
    return tmp_path


def tls_config(origin: Origin, redis_url: str, **tls: Any) -> dict[str, Any]:
    config = make_config(origin.url, redis_url)
    config["server"]["tls"] = {"cert": "server.pem", "key": "server.key", **tls}
    return config


async def start(factory: Any, pki: Path, config: dict[str, Any]) -> Any:
    """The config written beside the certificates, whose paths are relative to it."""
    path = write_config(pki / "sidecar.yaml", config)
    return await factory(config, str(path))


def port_of(sidecar: Any) -> int:
    return int(sidecar.runtime.public_port)


def https_get(port: int, cafile: Path, path: str = "/hello", *,
              client_cert: tuple[Path, Path] | None = None,
              max_version: ssl.TLSVersion | None = None) -> tuple[bytes, str | None]:
    """One request with Python's ssl client; the raw answer and the protocol ALPN chose."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["http/1.1"])
    if client_cert is not None:
        context.load_cert_chain(*client_cert)
    if max_version is not None:
        context.maximum_version = max_version
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                     .encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer, conn.selected_alpn_protocol()


async def test_curl_and_pythons_ssl_client_are_answered_over_tls(
        sidecar_factory: Any, origin: Origin, redis_url: str, pki: Path) -> None:
    origin.reply("/hello", body="over tls")
    sidecar = await start(sidecar_factory, pki, tls_config(origin, redis_url))
    port = port_of(sidecar)
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sv", "--cacert", str(pki / "ca.pem"), f"https://localhost:{port}/hello",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await curl.communicate()
    assert curl.returncode == 0, err.decode()
    assert out == b"over tls"
    assert "ALPN: server accepted http/1.1" in err.decode()
    assert origin.seen["/hello"]["X-Forwarded-Proto"] == "https"

    answer, alpn = await asyncio.to_thread(https_get, port, pki / "ca.pem")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"over tls")
    assert alpn == "http/1.1"


async def test_a_plain_http_request_to_the_tls_port_gets_a_clear_400(
        sidecar_factory: Any, origin: Origin, redis_url: str, pki: Path) -> None:
    sidecar = await start(sidecar_factory, pki, tls_config(origin, redis_url))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(sidecar))
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"plain HTTP request was sent" in answer


async def test_versions_below_min_version_are_refused(
        sidecar_factory: Any, origin: Origin, redis_url: str, pki: Path) -> None:
    origin.reply("/hello", body="ok")
    sidecar = await start(sidecar_factory, pki, tls_config(origin, redis_url, min_version="1.3"))
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(https_get, port_of(sidecar), pki / "ca.pem",
                                max_version=ssl.TLSVersion.TLSv1_2)
    answer, _ = await asyncio.to_thread(https_get, port_of(sidecar), pki / "ca.pem")
    assert answer.endswith(b"ok")


async def test_a_renewed_certificate_is_served_after_a_reload(
        sidecar_factory: Any, origin: Origin, redis_url: str, pki: Path) -> None:
    origin.reply("/hello", body="ok")
    sidecar = await start(sidecar_factory, pki, tls_config(origin, redis_url))
    port = port_of(sidecar)

    def served_certificate() -> bytes:
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as conn:
            der = conn.getpeercert(binary_form=True)
            assert der is not None
            return der

    before = await asyncio.to_thread(served_certificate)
    make_cert(pki, "server", "ca")       # renewed in place, as certbot does
    renewed = ssl.PEM_cert_to_DER_cert((pki / "server.pem").read_text())
    assert renewed != before
    assert await asyncio.to_thread(served_certificate) == before  # until the reload
    assert await sidecar.runtime.reload("test")
    assert await asyncio.to_thread(served_certificate) == renewed

    (pki / "server.key").write_text("not a key")  # a broken renewal: the reload is refused
    assert not await sidecar.runtime.reload("test")
    assert "server.tls" in sidecar.runtime.last_reload_error
    assert await asyncio.to_thread(served_certificate) == renewed


async def test_client_certificates_are_required_with_client_ca(
        sidecar_factory: Any, origin: Origin, redis_url: str, pki: Path) -> None:
    origin.reply("/hello", body="mutual")
    make_ca(pki, "clients")
    client = make_cert(pki, "peer", "clients")
    make_ca(pki, "strangers")
    stranger = make_cert(pki, "stranger", "strangers")
    sidecar = await start(sidecar_factory, pki,
                          tls_config(origin, redis_url, client_ca="clients.pem"))
    port = port_of(sidecar)
    answer, _ = await asyncio.to_thread(https_get, port, pki / "ca.pem", client_cert=client)
    assert answer.endswith(b"mutual")
    for cert in (None, stranger):
        # In TLS 1.3 the server checks the client's certificate after the handshake: the
        # refusal comes up on the first read, as an alert or the connection closed unanswered.
        try:
            answer, _ = await asyncio.to_thread(https_get, port, pki / "ca.pem",
                                                client_cert=cert)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
            answer = repr(exc).encode()
        assert not answer.startswith(b"HTTP/"), answer
    assert origin.calls["/hello"] == 1


def test_check_says_which_tls_file_cannot_be_used(tmp_path: Path, pki: Path) -> None:
    config = make_config("http://127.0.0.1:1", "redis://127.0.0.1:1")
    config["server"]["tls"] = {"cert": "server.pem", "key": "missing.key"}
    with pytest.raises(ConfigError, match=r"server\.tls: cannot read .*missing\.key"):
        load_config(write_config(pki / "a.yaml", config))
    config["server"]["tls"] = {"cert": "server.pem", "key": "ca.key"}  # not its key
    with pytest.raises(ConfigError, match=r"server\.tls: cannot use the certificate"):
        load_config(write_config(pki / "b.yaml", config))

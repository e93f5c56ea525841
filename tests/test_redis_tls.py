"""TLS to Redis: rediss:// with a CA file, a client certificate and key, against a real
TLS-enabled redis-server that requires client certificates. Certificates are made here with the
openssl command line tool.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from syncd import config
from syncd.redis.conn import connect
from syncd.testing.redis_server import RedisServer, RedisServerError, find_binary, free_port
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import DaemonProcess, config_dict, stream_events


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(where: Path) -> None:
    """ca.crt/ca.key; server.crt/.key for 127.0.0.1; client.crt/.key; other-ca.crt (unrelated)."""
    # Certificates as RFC 5280 wants them: Python 3.13 verifies strictly (VERIFY_X509_STRICT),
    # refusing a CA without key usage or a certificate without its issuer's key identifier.
    for ca in ("ca", "other-ca"):
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN=syncd test {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=where,
        )  # fmt: skip
    leaf = (
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    for name, ext in (
        ("server", leaf + "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", leaf + "extendedKeyUsage=clientAuth"),
    ):
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=syncd test {name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr",
            cwd=where,
        )  # fmt: skip
        (where / f"{name}.ext").write_text(ext + "\n")
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
            cwd=where,
        )  # fmt: skip
    for key in where.glob("*.key"):
        key.chmod(0o600)


class TlsRedis:
    def __init__(self, server: RedisServer, tls_port: int, certs: Path) -> None:
        self.server, self.tls_port, self.certs = server, tls_port, certs

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0"


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsRedis]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line tool is not installed: cannot make certificates")
    with tempfile.TemporaryDirectory(prefix="syncd-tls-") as tmp:
        certs = Path(tmp)
        make_certificates(certs)
        tls_port = free_port()
        server = RedisServer(
            extra_args=[
                "--appendonly", "no",
                "--tls-port", str(tls_port),
                "--tls-cert-file", str(certs / "server.crt"),
                "--tls-key-file", str(certs / "server.key"),
                "--tls-ca-cert-file", str(certs / "ca.crt"),
                "--tls-auth-clients", "yes",
            ]
        )  # fmt: skip
        try:
            server.start()
        except RedisServerError as exc:
            # A server built without TLS refuses the tls-* options at start.
            if "tls" in str(exc).lower():
                pytest.skip(f"{find_binary()} has no TLS support ({exc}): TLS is not tested")
            raise
        try:
            yield TlsRedis(server, tls_port, certs)
        finally:
            server.stop()


def redis_config(tls: TlsRedis, **files: str) -> config.RedisConfig:
    data = {
        "redis": {"url": tls.url, **files},
        "servicetitan": {"app_key": "k"},
        "tenants": [{"id": 1, "client_id": "c", "client_secret": "s"}],
    }
    return config.resolve(config.parse(data, "tls.toml"), environ={}).config.redis


def all_files(tls: TlsRedis) -> dict[str, str]:
    c = tls.certs
    return {
        "tls_ca_file": str(c / "ca.crt"),
        "tls_cert_file": str(c / "client.crt"),
        "tls_key_file": str(c / "client.key"),
    }


async def test_client_with_ca_and_client_certificate_talks_tls(tls_redis: TlsRedis) -> None:
    client = connect(redis_config(tls_redis, **all_files(tls_redis)))
    try:
        assert await client.ping()
        await client.set("tls:probe", "1")
        assert await client.get("tls:probe") == b"1"
    finally:
        await client.aclose()


@pytest.mark.parametrize("missing", ["client certificate", "right CA"])
async def test_without_client_certificate_or_with_another_ca_fails(
    tls_redis: TlsRedis, missing: str
) -> None:
    files = all_files(tls_redis)
    if missing == "client certificate":
        del files["tls_cert_file"], files["tls_key_file"]
    else:
        files["tls_ca_file"] = str(tls_redis.certs / "other-ca.crt")
    client = connect(redis_config(tls_redis, **files))
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
    finally:
        await client.aclose()


def test_world_readable_client_key_is_refused(tls_redis: TlsRedis, tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_bytes((tls_redis.certs / "client.key").read_bytes())
    key.chmod(0o644)
    files = {**all_files(tls_redis), "tls_key_file": str(key)}
    with pytest.raises(
        config.ConfigError, match=r"tls.toml: redis.tls_key_file: .*group or others"
    ):
        redis_config(tls_redis, **files)


def test_mismatched_key_is_named(tls_redis: TlsRedis) -> None:
    files = {**all_files(tls_redis), "tls_key_file": str(tls_redis.certs / "server.key")}
    with pytest.raises(config.ConfigError, match=r"tls.toml: redis.tls_cert_file: cannot load"):
        redis_config(tls_redis, **files)


async def test_daemon_once_over_tls(tls_redis: TlsRedis) -> None:
    plain = aioredis.Redis.from_url(tls_redis.server.url)
    try:
        async with run_simulator(tenants=[9601], records=30, page_size=10) as sim:
            data = config_dict(tls_redis.url, sim.url, sim.app_key, [9601], ["crm.customers"])
            data["redis"].update(all_files(tls_redis))
            daemon = DaemonProcess(data)
            try:
                daemon.start("--once")
                code = await asyncio.to_thread(daemon.wait, 120)
                assert code == 0, "\n".join(daemon.log_lines()[-20:])
            finally:
                daemon.close()
        assert len(await stream_events(plain, 9601, "crm.customers")) == 30
    finally:
        await plain.aclose()

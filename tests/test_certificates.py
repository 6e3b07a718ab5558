"""firm.federation.certificates: the files a secure Flower deployment needs, checked with the same
loaders Flower uses and with a real TLS handshake on loopback (fast: no Flower process is started)."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from firm.errors import FirmError
from firm.federation import certificates
from firm.federation.certificates import (
    CertificateError,
    make_node_key,
    make_node_keys,
    make_tls_certificates,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------------
# TLS
# ------------------------------------------------------------------------------------------------


def test_tls_files_form_a_valid_chain_for_loopback(tmp_path: Path) -> None:
    files = make_tls_certificates(tmp_path / "pki")
    assert [p.name for p in (files.ca_certfile, files.server_certfile, files.server_keyfile)] == [
        "ca.crt", "server.pem", "server.key"]
    assert mode(files.server_keyfile) == 0o600 and mode(files.ca_certfile) == 0o644
    assert mode(tmp_path / "pki") == 0o700  # a directory it creates is private
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == ["ca.crt", "server.key", "server.pem"]  # no CA key

    ca = x509.load_pem_x509_certificate(files.ca_certfile.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_certfile.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or the issuer name is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    now = datetime.datetime.now(datetime.timezone.utc)
    assert server.not_valid_before_utc < now < server.not_valid_after_utc
    assert (server.not_valid_after_utc - now).days >= certificates.DEFAULT_VALID_DAYS - 1


def tls_handshake(files: certificates.TlsFiles, ca_certfile: Path, server_hostname: str) -> bytes:
    """Serve one TLS connection on loopback with the server certificate (as uvicorn does, through
    Python's ssl module) and connect to it as a client that trusts `ca_certfile`."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(files.server_certfile, files.server_keyfile)
    client_context = ssl.create_default_context(cafile=str(ca_certfile))

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hello")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_context.wrap_socket(raw, server_hostname=server_hostname) as tls:
                return tls.recv(5)
    finally:
        thread.join(timeout=10)
        listener.close()


@pytest.mark.parametrize("server_hostname", ["127.0.0.1", "localhost"])
def test_a_client_that_trusts_the_ca_completes_a_tls_handshake(tmp_path: Path, server_hostname: str) -> None:
    files = make_tls_certificates(tmp_path)
    assert tls_handshake(files, files.ca_certfile, server_hostname) == b"hello"


def test_a_client_that_trusts_another_ca_or_names_another_host_is_refused(tmp_path: Path) -> None:
    files = make_tls_certificates(tmp_path / "a")
    other = make_tls_certificates(tmp_path / "b")
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(files, other.ca_certfile, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(files, files.ca_certfile, "example.org")


def test_tls_hosts_become_ip_and_dns_names(tmp_path: Path) -> None:
    files = make_tls_certificates(tmp_path, hosts=["superlink.example.org", "10.0.0.5", "::1"], valid_days=2)
    server = x509.load_pem_x509_certificate(files.server_certfile.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1")]
    assert server.subject.rfc4514_string() == "CN=superlink.example.org"


@pytest.mark.parametrize("hosts", [[], ["bad host"], ["under_score.example"], [""], ["a..b"]])
def test_bad_hosts_are_refused_before_anything_is_written(tmp_path: Path, hosts: list[str]) -> None:
    with pytest.raises(CertificateError) as info:
        make_tls_certificates(tmp_path / "pki", hosts=hosts)
    assert isinstance(info.value, FirmError)
    assert not (tmp_path / "pki").exists()


def test_existing_files_are_not_overwritten_unless_asked(tmp_path: Path) -> None:
    first = make_tls_certificates(tmp_path)
    before = first.server_keyfile.read_bytes()
    with pytest.raises(CertificateError, match="refusing to overwrite"):
        make_tls_certificates(tmp_path)
    assert first.server_keyfile.read_bytes() == before
    make_tls_certificates(tmp_path, overwrite=True)
    assert first.server_keyfile.read_bytes() != before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_planted_symlink_never_receives_a_key(tmp_path: Path) -> None:
    """Before: the key went through ``.<name>.tmp-<pid>``, opened without O_EXCL/O_NOFOLLOW, so a
    link planted at that name (the pid is easy to guess) received the private key."""
    pki, outside = tmp_path / "pki", tmp_path / "attacker-owned"
    pki.mkdir()
    outside.write_text("attacker's file\n")
    for name in ("server.key", "supernode-0.key"):  # every name the old code would have used
        for pid in {os.getpid(), os.getpid() + 1}:
            (pki / f".{name}.tmp-{pid}").symlink_to(outside)
    (pki / "ca.crt").symlink_to(tmp_path / "nowhere")  # a dangling link counts as an existing file
    with pytest.raises(CertificateError, match="refusing to overwrite"):
        make_tls_certificates(pki)
    (pki / "ca.crt").unlink()
    tls = make_tls_certificates(pki)
    make_node_key(pki, "supernode-0")
    assert outside.read_text() == "attacker's file\n"
    assert b"PRIVATE KEY" in tls.server_keyfile.read_bytes() and not tls.server_keyfile.is_symlink()
    # with overwrite, a link at the key's own name is replaced, not written through
    (pki / "server.key").unlink()
    (pki / "server.key").symlink_to(outside)
    make_tls_certificates(pki, overwrite=True)
    assert outside.read_text() == "attacker's file\n" and not (pki / "server.key").is_symlink()
    assert stat.S_IMODE((pki / "server.key").stat().st_mode) == 0o600


def test_private_keys_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        tls = make_tls_certificates(tmp_path)
        node = make_node_key(tmp_path, "n")
    finally:
        os.umask(old)
    assert mode(tls.server_keyfile) == 0o600 and mode(node.private_key) == 0o600
    assert mode(node.public_key) == 0o644


# ------------------------------------------------------------------------------------------------
# SuperNode keys, read by Flower's own code
# ------------------------------------------------------------------------------------------------


def test_node_keys_are_what_flower_reads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes, sign_message, \
        verify_signature
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    files = make_node_key(tmp_path, "supernode-0")
    assert files.private_key.name == "supernode-0.key" and files.public_key.name == "supernode-0.pub"
    assert files.private_key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    algorithm, _, comment = files.public_key.read_text().strip().split(" ")
    assert (algorithm, comment) == ("ecdsa-sha2-nistp384", "supernode-0")

    # `flwr supernode register` turns the .pub file into the bytes the SuperLink stores ...
    registered = try_load_public_key(files.public_key)
    # ... and `flower-supernode --auth-supernode-private-key` loads the private key
    private, public = _try_setup_client_authentication(
        argparse.Namespace(auth_supernode_private_key=str(files.private_key), auth_supernode_public_key=None))
    assert isinstance(private.curve, ec.SECP384R1)
    # the SuperLink matches the node by these bytes and checks its signatures against them
    assert public_key_to_bytes(public) == registered
    signature = sign_message(private, b"2026-12-03T12:00:00+00:00")
    assert verify_signature(bytes_to_public_key(registered), b"2026-12-03T12:00:00+00:00", signature)


def test_each_node_gets_its_own_key(tmp_path: Path) -> None:
    keys = make_node_keys(tmp_path, 3)
    assert [k.private_key.name for k in keys] == ["supernode-0.key", "supernode-1.key", "supernode-2.key"]
    assert len({k.public_key.read_text().split(" ")[1] for k in keys}) == 3
    with pytest.raises(CertificateError):  # one existing file: nothing of the new set is written
        make_node_keys(tmp_path, 4)
    assert not (tmp_path / "supernode-3.key").exists()


@pytest.mark.parametrize("name", ["", "a/b", ".hidden", "two words", "tab\there"])
def test_bad_node_key_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CertificateError):
        make_node_key(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# python -m firm.federation.certificates
# ------------------------------------------------------------------------------------------------


def test_command_line_writes_everything_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "secrets"
    assert certificates.main([str(out), "--nodes", "2", "--host", "127.0.0.1", "--host", "superlink.lan"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "ca.crt", "server.key", "server.pem", "supernode-0.key", "supernode-0.pub", "supernode-1.key", "supernode-1.pub"]
    assert "server certificate" in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    assert certificates.main([str(out), "--nodes", "3"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # supernode-2 not written either

    assert certificates.main([str(out), "--no-tls", "--nodes", "1", "--prefix", "extra"]) == 0
    assert (out / "extra-0.key").is_file() and (out / "ca.crt").read_bytes() == before["ca.crt"]

"""TLS certificates and SuperNode keys for a secure Flower deployment, made with ``cryptography``.

A Flower 1.42 deployment is secured two ways, and this module makes the files for both:

* **TLS** between everything and the SuperLink. :func:`make_tls_certificates` makes a throw-away
  certificate authority (CA) and a server certificate for the SuperLink's host names, signed by it:

  - ``ca.crt``: the CA certificate (PEM, X.509). The SuperLink takes it as ``--ssl-ca-certfile``
    (and hands it to its own ServerApp/SuperExec processes); every SuperNode takes it as
    ``--root-certificates``, and the ``flwr`` CLI as ``root-certificates`` in its SuperLink
    connection (``$FLWR_HOME/config.toml``).
  - ``server.pem``: the SuperLink's certificate (PEM, X.509), valid for ``127.0.0.1`` and
    ``localhost`` by default (subject alternative names; clients check them), ``--ssl-certfile``.
  - ``server.key``: its private key (PEM, PKCS#8, unencrypted, mode 0600), ``--ssl-keyfile``.

  The CA's own private key is never written: the CA can sign nothing after this call, so a leaked
  directory cannot be used to mint further certificates. Make a new set to renew, or use your
  organisation's CA for anything long-lived.

* **SuperNode authentication** (``flower-superlink --enable-supernode-auth``, which requires TLS):
  each SuperNode owns an elliptic-curve key pair on a NIST curve (P-384 here, as Flower's docs use).
  :func:`make_node_key` writes

  - ``<name>.key``: the private key in OpenSSH format (``-----BEGIN OPENSSH PRIVATE KEY-----``,
    unencrypted, mode 0600), read by ``flower-supernode --auth-supernode-private-key`` (Flower loads
    it with ``load_ssh_private_key``; a PEM/PKCS#8 key is refused);
  - ``<name>.pub``: the public key as one OpenSSH line (``ecdsa-sha2-nistp384 AAAA... <name>``),
    which the operator registers with ``flwr supernode register <name>.pub <connection>`` before the
    node connects (Flower loads it with ``load_ssh_public_key``).

  The SuperLink only activates a node whose public key was registered and which signs its requests
  with the matching private key; anyone else is refused.

The openssl / ssh-keygen equivalents are in ``docs/deployment.md``. From a shell::

    python -m firm.federation.certificates DIR --nodes 2

writes ``DIR/ca.crt``, ``DIR/server.pem``, ``DIR/server.key``, ``DIR/supernode-0.key/.pub`` and
``DIR/supernode-1.key/.pub``, and refuses to overwrite existing files.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from firm.errors import FirmError

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_VALID_DAYS = 30
NODE_KEY_CURVE = ec.SECP384R1
CA_FILENAME, SERVER_CERT_FILENAME, SERVER_KEY_FILENAME = "ca.crt", "server.pem", "server.key"

__all__ = [
    "DEFAULT_HOSTS",
    "NodeKeyFiles",
    "TlsFiles",
    "make_node_key",
    "make_node_keys",
    "make_tls_certificates",
]


class CertificateError(FirmError, ValueError):
    """The certificates or keys cannot be made as asked (bad host name, file already there)."""


@dataclass(frozen=True)
class TlsFiles:
    """Where :func:`make_tls_certificates` wrote the SuperLink's TLS files."""

    ca_certfile: Path  # --ssl-ca-certfile (SuperLink), --root-certificates (SuperNode, flwr CLI)
    server_certfile: Path  # --ssl-certfile (SuperLink)
    server_keyfile: Path  # --ssl-keyfile (SuperLink)


@dataclass(frozen=True)
class NodeKeyFiles:
    """One SuperNode's authentication key pair, as :func:`make_node_key` wrote it."""

    private_key: Path  # flower-supernode --auth-supernode-private-key
    public_key: Path  # flwr supernode register <public_key>


# ------------------------------------------------------------------------------------------------
# TLS
# ------------------------------------------------------------------------------------------------


def make_tls_certificates(directory: str | os.PathLike[str], hosts: Sequence[str] = DEFAULT_HOSTS,
                          valid_days: int = DEFAULT_VALID_DAYS, overwrite: bool = False) -> TlsFiles:
    """Make a throw-away CA and a SuperLink server certificate for `hosts`, signed by it.

    `hosts` are the names clients use to reach the SuperLink: IP addresses become IP subject
    alternative names, anything else DNS names (the first one is also the common name). Files go
    into `directory` (created if needed): ``ca.crt``, ``server.pem``, ``server.key``; existing files
    are an error unless `overwrite`. Returns their paths.
    """
    hosts = list(hosts)
    if not hosts:
        raise CertificateError("the server certificate needs at least one host name or IP address")
    if valid_days < 1:
        raise CertificateError(f"valid_days must be at least 1, got {valid_days}")
    alt_names = [_subject_alt_name(host) for host in hosts]
    directory = Path(directory)
    files = TlsFiles(directory / CA_FILENAME, directory / SERVER_CERT_FILENAME, directory / SERVER_KEY_FILENAME)
    _check_writable([files.ca_certfile, files.server_certfile, files.server_keyfile], overwrite)

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FIRM throw-away CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # a new directory of secrets: owner only
    _write(files.ca_certfile, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.server_certfile, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.server_keyfile, server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()), private=True)
    return files


def _subject_alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if not host or not all(label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
                           for label in labels):
        raise CertificateError(f"not an IP address or DNS name: {host!r}")
    return x509.DNSName(host)


# ------------------------------------------------------------------------------------------------
# SuperNode authentication keys
# ------------------------------------------------------------------------------------------------


def make_node_key(directory: str | os.PathLike[str], name: str, overwrite: bool = False) -> NodeKeyFiles:
    """Make one SuperNode's EC P-384 key pair: ``<name>.key`` (OpenSSH private key, mode 0600) and
    ``<name>.pub`` (one OpenSSH public-key line, commented with `name`) in `directory`."""
    if not name or "/" in name or name.startswith(".") or not name.isprintable() or " " in name:
        raise CertificateError(f"a node key name must be a plain file name, got {name!r}")
    directory = Path(directory)
    files = NodeKeyFiles(directory / f"{name}.key", directory / f"{name}.pub")
    _check_writable([files.private_key, files.public_key], overwrite)

    key = ec.generate_private_key(NODE_KEY_CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # a new directory of secrets: owner only
    _write(files.private_key, private, private=True)
    _write(files.public_key, public + f" {name}\n".encode(), private=False)
    return files


def make_node_keys(directory: str | os.PathLike[str], count: int, prefix: str = "supernode",
                   overwrite: bool = False) -> list[NodeKeyFiles]:
    """Key pairs for `count` SuperNodes, named ``<prefix>-0`` ... ``<prefix>-<count-1>``."""
    if count < 0:
        raise CertificateError(f"the number of node keys cannot be negative, got {count}")
    names = [f"{prefix}-{index}" for index in range(count)]
    directory = Path(directory)
    _check_writable([directory / f"{name}{suffix}" for name in names for suffix in (".key", ".pub")], overwrite)
    return [make_node_key(directory, name, overwrite=overwrite) for name in names]


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def _check_writable(paths: list[Path], overwrite: bool) -> None:
    """Refuse before writing anything, so a refused call leaves no half-made set behind. A symbolic
    link counts as an existing file, even one that points nowhere."""
    if overwrite:
        return
    existing = [str(path) for path in paths if path.exists() or path.is_symlink()]
    if existing:
        raise CertificateError(f"refusing to overwrite {', '.join(existing)} (pass overwrite=True / --overwrite)")


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write `data` to a fresh temporary file with its final mode, then move it into place: a private
    key is never readable by others, not even for a moment, and no file is ever half written. The
    temporary file has a random name and is created with O_EXCL | O_NOFOLLOW (tempfile.mkstemp), so a
    file or symbolic link planted in the directory can neither receive the key nor be truncated; the
    final rename replaces a link at `path` itself, never what it points to."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o600 if private else 0o644)  # the mode even if the umask differed
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------
# python -m firm.federation.certificates
# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m firm.federation.certificates",
        description="Make a throw-away CA, a SuperLink TLS certificate signed by it, and SuperNode "
                    "authentication key pairs, in the formats Flower expects.",
    )
    parser.add_argument("directory", help="where to write the files (created if needed)")
    parser.add_argument("--nodes", type=int, default=0, metavar="N",
                        help="also make N SuperNode key pairs <prefix>-0.key/.pub ... (default: 0)")
    parser.add_argument("--prefix", default="supernode", help="file name prefix of the node keys (default: supernode)")
    parser.add_argument("--host", action="append", dest="hosts", metavar="NAME",
                        help="an IP address or DNS name of the SuperLink, repeatable "
                             f"(default: {' '.join(DEFAULT_HOSTS)})")
    parser.add_argument("--valid-days", type=int, default=DEFAULT_VALID_DAYS,
                        help=f"validity of the certificates in days (default: {DEFAULT_VALID_DAYS})")
    parser.add_argument("--no-tls", action="store_true", help="make only the node keys")
    parser.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    args = parser.parse_args(argv)
    try:
        if not args.overwrite:  # check every file before writing any
            tls_names = [] if args.no_tls else [CA_FILENAME, SERVER_CERT_FILENAME, SERVER_KEY_FILENAME]
            node_names = [f"{args.prefix}-{i}{suffix}" for i in range(max(args.nodes, 0)) for suffix in (".key", ".pub")]
            _check_writable([Path(args.directory) / name for name in tls_names + node_names], overwrite=False)
        if not args.no_tls:
            tls = make_tls_certificates(args.directory, hosts=args.hosts or DEFAULT_HOSTS,
                                        valid_days=args.valid_days, overwrite=args.overwrite)
            print(f"CA certificate:     {tls.ca_certfile}")
            print(f"server certificate: {tls.server_certfile}")
            print(f"server key:         {tls.server_keyfile}")
        for node in make_node_keys(args.directory, args.nodes, prefix=args.prefix, overwrite=args.overwrite):
            print(f"node key pair:      {node.private_key} {node.public_key}")
    except (FirmError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

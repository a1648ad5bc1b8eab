"""Throw-away credentials for one local deployment: a CA, a server certificate for
127.0.0.1 / localhost signed by it, and an EC key pair per SuperNode.

Generated with the ``cryptography`` package, which Flower itself depends on (its SuperNode
reads the node key with ``load_ssh_private_key``), so it is there wherever ``flwr`` is.
Valid for a day: they live in a private directory that the run removes at its end.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1  # Flower's docs use P-384; `flwr supernode register` takes any NIST curve
VALID = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Tls:
    """PEM files: the CA certificate (clients trust it), the server's certificate and key."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's key pair in OpenSSH format: the private key for ``flower-supernode
    --auth-supernode-private-key``, the public one for ``flwr supernode register``."""

    private: Path
    public: Path


def _write_private(path: Path, data: bytes) -> Path:
    """A new file, mode 0o600 (less under a stricter umask) from the moment it exists; a file
    or link already at ``path`` is an error, never written through."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Tls:
    """A new CA and a server certificate for ``hosts`` (IP addresses or DNS names) in
    ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + VALID
    ca_key = ec.generate_private_key(CURVE())
    ca_name = _name("adc-flwr throw-away CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(CURVE())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    tls = Tls(ca=folder / "ca.crt", cert=folder / "server.pem", key=folder / "server.key")
    tls.ca.write_bytes(ca.public_bytes(pem))
    tls.cert.write_bytes(cert.public_bytes(pem))
    _write_private(
        tls.key,
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return tls


def make_node_key(folder: Path, name: str) -> NodeKey:
    """A new EC key pair ``folder/name`` and ``folder/name.pub`` (OpenSSH format, as
    ``flower-supernode`` and ``flwr supernode register`` read them)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(CURVE())
    node = NodeKey(private=folder / name, public=folder / f"{name}.pub")
    _write_private(
        node.private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    node.public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return node

"""Certificates and keys for a deployment, made with the `cryptography` library.

    <dir>/ca.pem, ca.key               the deployment's own certificate authority
    <dir>/server.pem, server.key       the SuperLink's TLS certificate (SANs: the given hosts,
                                       plus localhost and 127.0.0.1), signed by the CA
    <dir>/devices/<name>.key, .pub     a device's EC P-384 key pair in OpenSSH format: what
                                       `flower-supernode --auth-supernode-private-key` reads and
                                       `flwr supernode register` registers (Flower 1.42)

Devices get ca.pem (to verify the server) and their own .key; the server keeps ca.key,
server.key and every device's .pub. Private keys are written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
DEVICES = "devices"
VALID_DAYS = 365


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrec"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def create_ca(folder: Path, *, days: int = VALID_DAYS) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedrec deployment CA"))
        .issuer_name(_name("fedrec deployment CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    folder = Path(folder)
    return (
        _write(folder / CA_CERT, cert.public_bytes(serialization.Encoding.PEM)),
        _write(folder / CA_KEY, _pem_key(key), private=True),
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_server_cert(
    folder: Path, hosts: list[str], *, days: int = VALID_DAYS
) -> tuple[Path, Path]:
    """A TLS server certificate for `hosts` (DNS names or IP addresses), signed by the CA in
    `folder` (created first if missing)."""
    folder = Path(folder)
    if not (folder / CA_CERT).exists():
        create_ca(folder, days=days)
    ca_cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), None)
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else "localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return (
        _write(folder / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM)),
        _write(folder / SERVER_KEY, _pem_key(key), private=True),
    )


def create_device_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair for SuperNode authentication, OpenSSH format."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad device name {name!r}")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    devices = Path(folder) / DEVICES
    return (
        _write(devices / f"{name}.key", private, private=True),
        _write(devices / f"{name}.pub", public + f" fedrec-device-{name}\n".encode()),
    )


def device_public_keys(folder: Path) -> list[Path]:
    """Every device public key under `folder` (a devices/ folder or the certificates folder)."""
    folder = Path(folder)
    if (folder / DEVICES).is_dir():
        folder = folder / DEVICES
    return sorted(folder.glob("*.pub"))

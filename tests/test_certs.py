"""`fedrec certs`: a CA, a server certificate for the given hosts, device keys Flower reads."""

from __future__ import annotations

import ipaddress
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedrec.common.certs import (
    create_device_key,
    create_server_cert,
    device_public_keys,
)


def test_server_certificate_is_signed_by_the_ca_for_every_host(tmp_path):
    cert_path, key_path = create_server_cert(tmp_path, ["fedrec.example.org", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fedrec.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
    }
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "ca.key").stat().st_mode & 0o777) == "0o600"
    # what a TLS server and a client verifying it load
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    assert client.verify_mode == ssl.CERT_REQUIRED
    # a second server certificate reuses the CA
    create_server_cert(tmp_path, ["other.example.org"])
    again = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    assert again.serial_number == ca.serial_number


def test_device_keys_are_what_flower_node_authentication_reads(tmp_path):
    private, public = create_device_key(tmp_path, "phone-1")
    key = load_ssh_private_key(private.read_bytes(), None)  # flower-supernode's reader
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    pub = load_ssh_public_key(public.read_bytes())  # `flwr supernode register`'s reader
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    assert device_public_keys(tmp_path) == [public]
    with pytest.raises(ValueError):
        create_device_key(tmp_path, "../escape")

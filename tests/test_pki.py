"""The certificates a sandbox generates are the ones a kubeadm cluster would have."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from labkit.sandbox.pki import CERTS, PKI


def _cert(pki: PKI, stem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.cert(stem).read_bytes())


def test_every_certificate_chains_to_its_ca(tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    pki.generate()
    for spec in CERTS:
        cert, ca = _cert(pki, spec.stem), _cert(pki, spec.ca)
        cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == spec.common_name
    # Separate trust roots: a cluster client certificate is no key to etcd.
    assert _cert(pki, "etcd/ca").subject != _cert(pki, "ca").subject
    assert _cert(pki, "front-proxy-ca").subject != _cert(pki, "ca").subject


def test_apiserver_serving_names_and_admin_group(tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    pki.generate()
    san = _cert(pki, "apiserver").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "kubernetes.default.svc.cluster.local" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("10.96.0.1") in san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    admin = _cert(pki, "admin")
    assert admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:masters"
    usage = admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (pki.key("admin").stat().st_mode & 0o777) == 0o600
    assert isinstance(admin.public_key(), ec.EllipticCurvePublicKey)


def test_kubeconfig_is_self_contained(tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    pki.generate()
    config = yaml.safe_load(pki.kubeconfig(cluster="c", server="https://127.0.0.1:1", user="u", stem="admin"))
    assert config["current-context"] == "c"
    assert config["clusters"][0]["cluster"]["certificate-authority-data"]
    assert config["users"][0]["user"]["client-key-data"]


def test_ensure_keeps_existing_keys(tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    pki.ensure()
    first = pki.cert("ca").read_bytes()
    pki.ensure()
    assert pki.cert("ca").read_bytes() == first

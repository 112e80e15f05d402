"""Certificates and kubeconfigs for one sandbox, made with ``cryptography``.

The layout mirrors what kubeadm writes to /etc/kubernetes/pki, so the course can
point at a sandbox's files when it explains a real cluster's:

* ``ca``: the cluster CA. Signs the API server's serving certificate and every
  client certificate (admin, controller-manager, scheduler, the API server's own
  client for the node agents) and the serving certificates of the other components.
* ``nodes/NAME`` and ``nodes/NAME-serving``: each node's client certificate (how
  its agent talks to the API server) and serving certificate (its kubelet API,
  which the API server calls for ``kubectl logs``).
* ``etcd/ca``: a separate CA for etcd, so that a cluster client certificate is
  not also a key to the database.
* ``front-proxy-ca`` and ``front-proxy-client``: the pair API aggregation uses.
* ``sa.key`` / ``sa.pub``: the service-account token signing key pair.

Keys are ECDSA P-256: as strong as RSA-3072 for this purpose and generated in
microseconds, which keeps ``sandbox up`` fast.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from labkit.errors import LabkitError

CA_DAYS = 3650
LEAF_DAYS = 365
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"  # the first address of SERVICE_CIDR
CLUSTER_DNS_IP = "10.96.0.10"  # the kube-dns Service's, as kubeadm makes it


@dataclass(frozen=True)
class CertSpec:
    """One certificate to issue: its file stem, signer, subject and uses."""

    stem: str
    ca: str
    common_name: str
    organization: str | None = None
    server: bool = False
    client: bool = False
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()


CAS = {"ca": "kubernetes", "etcd/ca": "etcd-ca", "front-proxy-ca": "front-proxy-ca"}
LOCAL_DNS = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")
CERTS = (
    CertSpec(
        "apiserver", "ca", "kube-apiserver", server=True,
        dns=("kubernetes", "kubernetes.default", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local", *LOCAL_DNS),
        ips=(KUBERNETES_SERVICE_IP, *LOCAL_IPS),
    ),
    CertSpec("apiserver-kubelet-client", "ca", "kube-apiserver-kubelet-client", "system:masters", client=True),
    CertSpec("apiserver-etcd-client", "etcd/ca", "kube-apiserver-etcd-client", client=True),
    CertSpec("etcd/server", "etcd/ca", "etcd", server=True, client=True, dns=LOCAL_DNS, ips=LOCAL_IPS),
    CertSpec("front-proxy-client", "front-proxy-ca", "front-proxy-client", client=True),
    CertSpec("admin", "ca", "kubernetes-admin", "system:masters", client=True),
    CertSpec("controller-manager", "ca", "system:kube-controller-manager", client=True),
    CertSpec("scheduler", "ca", "system:kube-scheduler", client=True),
    CertSpec("controller-manager-serving", "ca", "kube-controller-manager", server=True, dns=LOCAL_DNS, ips=LOCAL_IPS),
    CertSpec("scheduler-serving", "ca", "kube-scheduler", server=True, dns=LOCAL_DNS, ips=LOCAL_IPS),
)  # fmt: skip


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, now: dt.datetime, days: int, *, ca: bool
) -> x509.CertificateBuilder:
    """What every certificate here shares: validity, basic constraints and key usage."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                crl_sign=ca, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )  # fmt: skip


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    tmp.replace(path)


class PKI:
    """The certificate folder of one sandbox."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def cert(self, stem: str) -> Path:
        return self.folder / f"{stem}.crt"

    def key(self, stem: str) -> Path:
        return self.folder / f"{stem}.key"

    @property
    def sa_key(self) -> Path:
        return self.folder / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.folder / "sa.pub"

    def expected_files(self) -> list[Path]:
        stems = [*CAS, *(spec.stem for spec in CERTS)]
        return [p for stem in stems for p in (self.cert(stem), self.key(stem))] + [self.sa_key, self.sa_pub]

    def exists(self) -> bool:
        return any(path.exists() for path in self.expected_files())

    def ensure(self) -> None:
        """Create everything on first use; on later uses check it is whole and readable."""
        if not self.exists():
            self.generate()
            return
        missing = [p for p in self.expected_files() if not p.exists()]
        if missing:
            raise LabkitError(
                f"The sandbox's certificate folder {self.folder} is incomplete "
                f"({len(missing)} files missing, e.g. {missing[0].name}).",
                hint="Recreate the sandbox with `labkit sandbox down --purge` and `labkit sandbox up` "
                "(this deletes its cluster state).",
            )
        for path in self.expected_files():
            try:
                data = path.read_bytes()
                if path.suffix == ".crt":
                    x509.load_pem_x509_certificate(data)
                elif path.name == "sa.pub":
                    serialization.load_pem_public_key(data)
                else:
                    serialization.load_pem_private_key(data, password=None)
            except (ValueError, OSError) as exc:
                raise LabkitError(
                    f"The sandbox file {path} is not a valid PEM certificate or key ({exc}).",
                    hint="Recreate the sandbox with `labkit sandbox down --purge` and `labkit sandbox up` "
                    "(this deletes its cluster state).",
                ) from None

    def generate(self) -> None:
        now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate clock skew
        cas: dict[str, tuple[x509.Certificate, ec.EllipticCurvePrivateKey]] = {}
        for stem, common_name in CAS.items():
            key = _new_key()
            subject = _name(common_name)
            cert = (
                _builder(subject, subject, key, now, CA_DAYS, ca=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256())
            )
            cas[stem] = (cert, key)
            _write(self.key(stem), _key_pem(key), private=True)
            _write(self.cert(stem), cert.public_bytes(serialization.Encoding.PEM))

        for spec in CERTS:
            self._issue(spec, *cas[spec.ca], now)

        sa = _new_key()
        _write(self.sa_key, _key_pem(sa), private=True)
        _write(
            self.sa_pub,
            sa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )

    def _issue(
        self, spec: CertSpec, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, now: dt.datetime
    ) -> None:
        key = _new_key()
        usages = []
        if spec.server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if spec.client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            _builder(_name(spec.common_name, spec.organization), ca_cert.subject, key, now, LEAF_DAYS, ca=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if spec.dns or spec.ips:
            names: list[x509.GeneralName] = [x509.DNSName(d) for d in spec.dns]
            names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in spec.ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write(self.key(spec.stem), _key_pem(key), private=True)
        _write(self.cert(spec.stem), cert.public_bytes(serialization.Encoding.PEM))

    def ensure_node(self, node: str) -> str:
        """A node's client certificate, ``system:node:NAME`` in ``system:nodes`` (as kubelet TLS
        bootstrap would obtain); returns its file stem."""
        return self._ensure_issued(CertSpec(f"nodes/{node}", "ca", f"system:node:{node}", "system:nodes", client=True))

    def ensure_proxy(self) -> str:
        """kube-proxy's client certificate (``system:kube-proxy``, whom the default RBAC lets watch Services
        and EndpointSlices), for the agent's service proxy; returns its file stem."""
        return self._ensure_issued(CertSpec("kube-proxy", "ca", "system:kube-proxy", client=True))

    def ensure_chaos(self) -> str:
        """The node agent's chaos controller's client certificate (``labkit:chaos-controller``, which the
        sandbox's ClusterRole of that name lets carry out Chaos Mesh's experiments); returns its file stem."""
        return self._ensure_issued(CertSpec("chaos-controller", "ca", "labkit:chaos-controller", client=True))

    def ensure_node_serving(self, node: str) -> str:
        """A node's serving certificate for its kubelet API (logs), returns its file stem.

        Signed by the cluster CA with the names the API server dials (the node's InternalIP
        127.0.0.1, and its hostname), as a kubelet's approved serving CSR would be, so the API
        server can verify it with ``--kubelet-certificate-authority``.
        """
        spec = CertSpec(f"nodes/{node}-serving", "ca", f"system:node:{node}", "system:nodes", server=True,
                        dns=(node,), ips=("127.0.0.1",))  # fmt: skip
        return self._ensure_issued(spec)

    def _ensure_issued(self, spec: CertSpec) -> str:
        """Issue ``spec`` with the cluster CA unless its files exist; returns its stem."""
        if not (self.cert(spec.stem).exists() and self.key(spec.stem).exists()):
            ca_cert = x509.load_pem_x509_certificate(self.cert(spec.ca).read_bytes())
            ca_key = serialization.load_pem_private_key(self.key(spec.ca).read_bytes(), password=None)
            assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
            now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
            self._issue(spec, ca_cert, ca_key, now)
        return spec.stem

    def kubeconfig(self, *, cluster: str, server: str, user: str, stem: str) -> str:
        """A self-contained kubeconfig (certificates embedded) for client certificate ``stem``."""
        import base64

        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": cluster, "cluster": {"server": server, "certificate-authority-data": b64(self.cert("ca"))}}
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": b64(self.cert(stem)),
                        "client-key-data": b64(self.key(stem)),
                    },
                }
            ],
            "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user}}],
            "current-context": cluster,
            "preferences": {},
        }
        return yaml.safe_dump(config, sort_keys=False)

    def write_kubeconfig(self, path: Path, **kwargs: str) -> None:
        _write(path, self.kubeconfig(**kwargs).encode(), private=True)

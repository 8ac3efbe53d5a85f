"""Throwaway certificates for TLS tests, from the ``openssl`` CLI (the ``cryptography`` package is
not a dependency): a CA, a second ("rogue") CA, a server certificate for 127.0.0.1/localhost, and
client certificates signed by each CA. Tests skip without ``openssl``."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["make_certs"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=keyCertSign",
        cwd=d,
    )


def _leaf(d: Path, name: str, ca: str, ext: str) -> None:
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=d,
    )


def make_certs(d: Path) -> Path:
    """``ca``, ``rogue-ca``, ``server`` (serverAuth, IP:127.0.0.1), ``client`` (clientAuth, CN
    ``client``, signed by ``ca``), ``rogue`` (signed by ``rogue-ca``): NAME.pem and NAME.key."""
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(
        d,
        "server",
        "ca",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    return d

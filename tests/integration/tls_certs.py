"""A throwaway certificate authority for TLS tests, made with the openssl CLI.

    ca = TestCA(tmp_path / "ca")          # CA key and self-signed certificate
    cert, key = ca.leaf("petrel.test", ips=["127.0.0.1"])
    ctx = ca.client_context()             # Python ssl context trusting the CA

Every leaf is signed by the CA, has its name as CN and as a DNS
subjectAltName (plus any IP SANs), and an EC P-256 key (fast to make). Files
live under the directory given; nothing is installed system-wide. Each
openssl run has a timeout.
"""

import ssl
import subprocess
from pathlib import Path


def _openssl(args, cwd, timeout=30):
    cp = subprocess.run(["openssl"] + list(args), cwd=str(cwd), capture_output=True,
                        timeout=timeout, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, (f"openssl {' '.join(args)}: exit {cp.returncode}\n"
                                f"{cp.stderr.decode('utf-8', 'replace')}")
    return cp


class TestCA:
    """A CA in dir (created): ca.pem / ca.key; leaves as <name>.pem / <name>.key."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory, cn="Petrel Test CA"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert = self.dir / "ca.pem"
        self.key = self.dir / "ca.key"
        _openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                  "-nodes", "-keyout", str(self.key), "-out", str(self.cert), "-days", "2",
                  "-subj", f"/CN={cn}",
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign"], self.dir)

    def leaf(self, name, ips=(), extra_names=()):
        """A certificate for name (and extra_names, ips) signed by this CA: (cert, key)."""
        base = self.dir / name
        key, csr, ext, cert = (base.with_suffix(s) for s in (".key", ".csr", ".ext", ".pem"))
        sans = [f"DNS:{n}" for n in (name,) + tuple(extra_names)] + [f"IP:{ip}" for ip in ips]
        ext.write_text("subjectAltName=" + ",".join(sans) + "\n"
                       "extendedKeyUsage=serverAuth\n")
        _openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                  "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}"], self.dir)
        _openssl(["x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey",
                  str(self.key), "-CAcreateserial", "-days", "2", "-extfile", str(ext),
                  "-out", str(cert)], self.dir)
        return cert, key

    def client_context(self):
        """A client SSLContext that trusts only this CA and checks host names."""
        ctx = ssl.create_default_context(cafile=str(self.cert))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def server_context(self, cert, key):
        """A server SSLContext for an MX (aiosmtpd's tls_context)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

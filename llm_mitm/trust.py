"""Trusting the mitmproxy CA: a marked block in certifi's cacert.pem, or a separate bundle.

The block is found by the CA's fingerprint, so adding twice changes nothing and a new
CA replaces the old one; removing it gives back the file byte for byte (the block
records whether it had to add a newline before itself).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from llm_mitm.atomic import write_atomic

DEFAULT_CONFDIR = Path("~/.mitmproxy")
CA_CERT_NAME = "mitmproxy-ca-cert.pem"
_BEGIN = "# llm-mitm: mitmproxy CA sha256={fp} newline={newline} BEGIN\n"
_END = "# llm-mitm: mitmproxy CA sha256={fp} END\n"
_BLOCK = re.compile(
    r"# llm-mitm: mitmproxy CA sha256=(?P<fp>[0-9a-f]{64}) newline=(?P<newline>[01]) BEGIN\n"
    r".*?# llm-mitm: mitmproxy CA sha256=(?P=fp) END\n",
    re.DOTALL,
)
_BUNDLE_MARK = re.compile(r"^# mitmproxy CA sha256=[0-9a-f]{64}\n-----BEGIN CERTIFICATE-----", re.MULTILINE)  # write_bundle's
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----\s*", re.DOTALL)


class TrustError(Exception):
    """One line that says what is wrong and what to do."""


@dataclass(frozen=True)
class CACert:
    path: Path
    pem: str
    fingerprint: str

    @classmethod
    def load(cls, path: Path) -> CACert:
        try:
            text = path.read_bytes().decode("utf-8", "replace")  # a DER file or a .p12 is no PEM, not a crash
        except FileNotFoundError:
            raise TrustError(f"no CA certificate at {path}: start mitmdump once, or name one with --ca") from None
        except OSError as exc:
            raise TrustError(f"cannot read the CA certificate {path}: {exc.strerror}") from None
        match = _PEM.search(text)
        if not match or not _loadable(match.group(0)):
            raise TrustError(f"{path} holds no PEM certificate")
        pem = match.group(0).strip() + "\n"
        return cls(path, pem, _fingerprint(pem))


def _loadable(pem: str) -> bool:
    """Whether OpenSSL reads it as a certificate: one it cannot read, put in a bundle, makes
    every client of that bundle fail to load it ("PEM lib"), not only for the proxy's hosts."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError):
        return False
    return True


def _fingerprint(pem: str) -> str:
    import base64

    body = "".join(line for line in pem.splitlines() if line and not line.startswith("-----"))
    return hashlib.sha256(base64.b64decode(body)).hexdigest()


def ensure_ca(confdir: Path) -> Path:
    """The CA certificate in `confdir`, generated with mitmproxy's own CertStore if missing."""
    confdir = confdir.expanduser()
    cert = confdir / CA_CERT_NAME
    if cert.exists():
        return cert
    try:
        from mitmproxy.certs import CertStore
    except ImportError:
        raise TrustError(f"no CA at {cert}, and mitmproxy is not importable here to make one: start mitmdump once") from None
    confdir.mkdir(parents=True, exist_ok=True)
    CertStore.from_store(str(confdir), "mitmproxy", 2048)
    return cert


def certifi_bundle(python: str | None = None) -> Path:
    """certifi's cacert.pem for this interpreter, or for the one at `python`."""
    if python is None:
        try:
            import certifi
        except ImportError:
            raise TrustError("certifi is not installed for this Python") from None
        return Path(certifi.where())
    try:
        result = subprocess.run(
            [python, "-c", "import certifi; print(certifi.where())"], capture_output=True, text=True, timeout=60
        )
    except OSError as exc:
        raise TrustError(f"cannot run {python}: {exc.strerror}") from None
    if result.returncode != 0:
        raise TrustError(f"certifi not found for {python} (pip install certifi there, or use --bundle)")
    return Path(result.stdout.strip())


def _own_certifi(bundle: Path, ca: CACert) -> None:
    """A distribution's certifi (Debian's python3-certifi) names the system's bundle:
    patched, every program on the machine would trust the CA, until the next
    update-ca-certificates silently took it out again. Its link too: a cacert.pem that is a
    link to the system's bundle (a probe: the CA went into that bundle)."""
    real = bundle.resolve()
    if real.parent.name != "certifi":
        where = f" (a link to {real})" if real != bundle.absolute() else ""
        raise TrustError(
            f"{bundle}{where} is not certifi's own cacert.pem but a bundle certifi only reads (a distribution's certifi): "
            f"trust the CA system-wide (on Debian: sudo cp {shlex.quote(str(ca.path))} /usr/local/share/ca-certificates/mitmproxy.crt "
            "&& sudo update-ca-certificates), or use --bundle PATH"
        )


def is_trusted(bundle: Path, ca: CACert) -> bool:
    """Our block, or the certificate itself anywhere in the bundle (put there system-wide,
    as `_own_certifi` advises, or by hand)."""
    text = _read(bundle)
    return any(m.group("fp") == ca.fingerprint for m in _BLOCK.finditer(text)) or any(
        _fingerprint_or_none(m.group(0)) == ca.fingerprint for m in _PEM.finditer(text))


def _fingerprint_or_none(pem: str) -> str | None:
    """A bundle's certificate's fingerprint; None for one that is no base64 at all."""
    import binascii

    try:
        return _fingerprint(pem)
    except (binascii.Error, ValueError):
        return None


def add(bundle: Path, ca: CACert) -> bool:
    """Append the CA block; False when it is already there."""
    text = _read(bundle)
    if is_trusted(bundle, ca):
        return False
    text = _without_blocks(text)  # an older CA of ours goes
    newline = "1" if text and not text.endswith("\n") else "0"
    block = _BEGIN.format(fp=ca.fingerprint, newline=newline) + ca.pem + _END.format(fp=ca.fingerprint)
    _write(bundle, text + ("\n" if newline == "1" else "") + block)
    return True


def remove(bundle: Path) -> bool:
    """Take our block out again; False when there was none."""
    text = _read(bundle)
    restored = _without_blocks(text)
    if restored == text:
        return False
    _write(bundle, restored)
    return True


def write_bundle(target: Path, ca: CACert, python: str | None = None) -> Path:
    """certifi's roots plus the CA, as a new file (certifi itself untouched), or over a
    bundle written so before (`llm-mitm env` refreshes it for a new CA); never over
    anything else: a mistyped --bundle replaced whatever the file held."""
    target = target.expanduser()
    _replaceable_bundle(target)
    roots = _without_blocks(_read(certifi_bundle(python)))
    if roots and not roots.endswith("\n"):
        roots += "\n"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrustError(f"cannot make the folder {target.parent}: {exc.strerror}") from None
    _write(target, roots + f"# mitmproxy CA sha256={ca.fingerprint}\n" + ca.pem, hint="")  # the mark _BUNDLE_MARK finds
    return target


def _replaceable_bundle(target: Path) -> None:
    """Nothing there, an empty file, something not a regular file (/dev/stdout), or a
    bundle of ours: our marker, and besides it only certificates and comment lines."""
    if not target.is_file():
        return
    try:
        text = target.read_bytes().decode("utf-8", "replace")
    except OSError as exc:
        raise TrustError(f"cannot read {target}: {exc.strerror}") from None
    rest = _PEM.sub("", text)
    ours = _BUNDLE_MARK.search(text) is not None and all(not line.strip() or line.startswith("#") for line in rest.splitlines())
    if text.strip() and not ours:
        raise TrustError(f"{target} exists and is not a bundle written by llm-mitm: left as it is (name a new file with --bundle)")


def bundle_environment(bundle: Path) -> dict[str, str]:
    """The variables that point clients at a bundle (never ones that turn checks off); its
    absolute path, for clients started in another directory."""
    path = os.path.abspath(bundle.expanduser())
    return {"SSL_CERT_FILE": path, "REQUESTS_CA_BUNDLE": path, "CURL_CA_BUNDLE": path, "NODE_EXTRA_CA_CERTS": path}


def requests_override(bundle: Path) -> str | None:
    """A note when this environment has `requests` read another file than `bundle`: it
    takes REQUESTS_CA_BUNDLE, then CURL_CA_BUNDLE, over certifi (a probe: "added", and
    requests still failed to verify)."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if value := os.environ.get(name):
            if Path(value).expanduser().resolve() == bundle.resolve():
                return None
            return (f"note: {name}={value} is set here: requests reads that file instead of certifi's, so it will not trust "
                    f"the CA this way (unset it, or use --bundle PATH and point {name} at that bundle)")
    return None


def _without_blocks(text: str) -> str:
    out = []
    position = 0
    for match in _BLOCK.finditer(text):
        start = match.start()
        # The newline `add` put after a last line that had none goes with the block, unless
        # something was written after the block since: it would be glued to that line.
        if match.group("newline") == "1" and start > 0 and text[start - 1] == "\n" and not text[match.end():].strip():
            start -= 1
        out.append(text[position:start])
        position = match.end()
    out.append(text[position:])
    return "".join(out)


def _read(path: Path) -> str:
    """Bytes that are no UTF-8 (a Latin-1 comment: OpenSSL skips it) are kept as they are,
    and `_write` gives them back, so a removal still restores the file byte for byte."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
            return handle.read()
    except FileNotFoundError:
        raise TrustError(f"{path} does not exist") from None
    except OSError as exc:
        raise TrustError(f"cannot read {path}: {exc.strerror}") from None


def _write(path: Path, text: str, hint: str = " (use --bundle PATH to write a separate bundle instead)") -> None:
    """Whole or not at all: a full disk part way must not cost the trust store its roots."""
    try:
        write_atomic(path, text.encode("utf-8", "surrogateescape"))
    except OSError as exc:
        raise TrustError(f"cannot write {path}: {exc.strerror or exc}{hint}") from None


def main(argv: list[str] | None = None) -> int:
    """scripts/trust-ca.py: add (default), --check, --remove, or --bundle PATH."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="trust-ca.py", description=__doc__.splitlines()[0])
    parser.add_argument("--confdir", type=Path, default=DEFAULT_CONFDIR, help="mitmproxy's confdir (default ~/.mitmproxy)")
    parser.add_argument("--ca", type=Path, help="the CA certificate (default CONFDIR/mitmproxy-ca-cert.pem)")
    parser.add_argument("--python", help="patch the certifi of this interpreter (your application's venv)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="exit 1 when the CA is not trusted")
    action.add_argument("--remove", action="store_true", help="restore cacert.pem as it was")
    action.add_argument("--bundle", type=Path, help="write certifi + CA to this new file (or a bundle it wrote before) instead")
    args = parser.parse_args(argv)
    try:
        if args.remove:
            bundle = certifi_bundle(args.python)
            print(f"removed the mitmproxy CA from {bundle}" if remove(bundle) else f"{bundle} holds no CA of ours")
            return 0
        # A check makes no CA: a mistyped --confdir got a new one, private key and all.
        ca_path = args.ca.expanduser() if args.ca else args.confdir.expanduser() / CA_CERT_NAME if args.check else ensure_ca(args.confdir)
        ca = CACert.load(ca_path)
        if args.bundle:
            target = write_bundle(args.bundle, ca, args.python)
            for name, value in bundle_environment(target).items():
                print(f"export {name}={shlex.quote(value)}")
            return 0
        bundle = certifi_bundle(args.python)
        if args.check:
            trusted = is_trusted(bundle, ca)
            print(f"{'trusted' if trusted else 'NOT trusted'}: {ca.path} in {bundle}")
            if trusted and (note := requests_override(bundle)):
                print(note)
            return 0 if trusted else 1
        _own_certifi(bundle, ca)
        changed = add(bundle, ca)
        print(f"{'added' if changed else 'already trusted:'} {ca.path} {'to' if changed else 'in'} {bundle}")
        print("note: upgrading certifi replaces this file; run this again afterwards (or use --bundle)")
        if note := requests_override(bundle):
            print(note)
        return 0
    except TrustError as exc:
        print(f"trust-ca: {exc}", file=sys.stderr)
        return 2

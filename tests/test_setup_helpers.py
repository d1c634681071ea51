"""trust-ca, the system proxy switch, the PowerShell script and `llm-mitm env`."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import venv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from llm_mitm import environment, sysproxy, trust
from tests.support.fake_provider import CANNED_REPLY
from tests.support.mitm import Mitmdump
from tests.test_e2e_clients import OPENAI_KEY, chat, marker, trace_with

ROOT = Path(__file__).resolve().parents[1]
TRUST_CA = ROOT / "scripts" / "trust-ca.py"
PS1 = ROOT / "scripts" / "interception-win.ps1"


@pytest.fixture(scope="module")
def app_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway application venv with requests and its own certifi."""
    folder = tmp_path_factory.mktemp("app-venv")
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "requests", "certifi"], check=True)
    return python


def app_request(app_python: Path, proxy: Mitmdump) -> subprocess.CompletedProcess[str]:
    """A plain `requests` call from the app venv: HTTPS_PROXY set, no CA variable at all."""
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_DIR")}
    env["HTTPS_PROXY"] = proxy.proxy_url
    code = "import requests; r = requests.get('https://api.openai.com/v1/models', timeout=20); print(r.status_code, r.text)"
    return subprocess.run([str(app_python), "-c", code], env=env, capture_output=True, text=True, timeout=60)


def trust_ca(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TRUST_CA), *args], capture_output=True, text=True, timeout=60)


def with_file_size_limit(limit: int, code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a Python that cannot grow any file past `limit` bytes: a disk that fills
    up part way through a real write (stdout and stderr are pipes, so not limited)."""
    prelude = (
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
    )
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_trust_ca_round_trip_in_another_venv(proxy: Mitmdump, app_python: Path) -> None:
    bundle = Path(subprocess.run([str(app_python), "-c", "import certifi; print(certifi.where())"], capture_output=True, text=True, check=True).stdout.strip())
    original = bundle.read_bytes()
    target = ["--confdir", str(proxy.confdir), "--python", str(app_python)]

    before = app_request(app_python, proxy)
    assert before.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in before.stderr

    assert trust_ca(*target, "--check").returncode == 1
    added = trust_ca(*target)
    assert added.returncode == 0 and "added" in added.stdout and str(bundle) in added.stdout
    after_first = bundle.read_bytes()
    again = trust_ca(*target)
    assert again.returncode == 0 and "already trusted" in again.stdout
    assert bundle.read_bytes() == after_first
    assert after_first.startswith(original) and after_first.count(b"llm-mitm: mitmproxy CA") == 2
    assert trust_ca(*target, "--check").returncode == 0

    trusted = app_request(app_python, proxy)
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout.startswith("200 ") and "gpt-4o" in trusted.stdout

    removed = trust_ca(*target, "--remove")
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert bundle.read_bytes() == original
    assert trust_ca(*target, "--check").returncode == 1
    assert app_request(app_python, proxy).returncode != 0


def test_bundle_instead_of_patching(proxy: Mitmdump, app_python: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    result = trust_ca("--confdir", str(proxy.confdir), "--python", str(app_python), "--bundle", str(bundle))
    assert result.returncode == 0
    assert f"export SSL_CERT_FILE={bundle}" in result.stdout
    assert f"export REQUESTS_CA_BUNDLE={bundle}" in result.stdout
    assert f"export NODE_EXTRA_CA_CERTS={bundle}" in result.stdout
    text = bundle.read_text()
    assert text.count("BEGIN CERTIFICATE") > 100  # certifi's roots, plus ours
    assert proxy.ca_cert.read_text().strip() in text


def test_trust_ca_errors_are_one_clear_line(tmp_path: Path) -> None:
    no_ca = trust_ca("--ca", str(tmp_path / "missing.pem"))
    assert no_ca.returncode == 2 and no_ca.stderr.count("\n") == 1
    assert "no CA certificate at" in no_ca.stderr and "Traceback" not in no_ca.stderr
    bare = tmp_path / "bare-venv"
    venv.create(bare, with_pip=False)
    no_certifi = trust_ca("--confdir", str(tmp_path / "conf"), "--python", str(bare / "bin" / "python"))
    assert no_certifi.returncode == 2 and "certifi not found for" in no_certifi.stderr and "--bundle" in no_certifi.stderr
    ca = trust.CACert.load(trust.ensure_ca(tmp_path / "conf"))  # made with mitmproxy's CertStore
    with pytest.raises(trust.TrustError, match=r"cannot write /proc/version: .*use --bundle"):
        trust.add(Path("/proc/version"), ca)


@pytest.mark.parametrize(
    "content",
    [
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",  # base64, but no certificate
        b"-----BEGIN CERTIFICATE-----\nnotbase64!\n-----END CERTIFICATE-----\n",
        b"0\x82\x03\xe6\x30\x82 a DER file, or a .p12",
    ],
)
def test_a_ca_file_that_is_no_certificate_is_refused_and_breaks_no_bundle(content: bytes, tmp_path: Path) -> None:
    """A --ca that held no certificate went into cacert.pem as one: every client of that
    certifi then failed to load it ("PEM lib"), or trust-ca died in a traceback (a setup probe)."""
    ssl = pytest.importorskip("ssl")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(content)
    bundle = tmp_path / "certifi" / "cacert.pem"
    bundle.parent.mkdir()
    shutil.copyfile(trust.certifi_bundle(), bundle)
    original = bundle.read_bytes()
    python = tmp_path / "app-python"
    python.write_text(f"#!/bin/sh\necho {bundle}\n")
    python.chmod(0o755)
    for args in ([], ["--bundle", str(tmp_path / "bundle.pem")]):
        result = trust_ca("--ca", str(ca), "--python", str(python), *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr == f"trust-ca: {ca} holds no PEM certificate\n"
    assert bundle.read_bytes() == original and not (tmp_path / "bundle.pem").exists()
    ssl.create_default_context(cafile=str(bundle))


def test_trust_ca_leaves_a_system_bundle_alone(tmp_path: Path) -> None:
    """Debian's python3-certifi names /etc/ssl/certs/ca-certificates.crt: patched, the
    whole machine trusted the CA (a config probe)."""
    system = tmp_path / "etc-ssl-certs" / "ca-certificates.crt"
    system.parent.mkdir()
    system.write_text("# the system's roots\n")
    python = tmp_path / "debian-python"
    python.write_text(f"#!/bin/sh\necho {system}\n")  # answers `import certifi; print(certifi.where())` as Debian's does
    python.chmod(0o755)
    refused = trust_ca("--confdir", str(tmp_path / "conf"), "--python", str(python))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"{system} is not certifi's own cacert.pem" in refused.stderr and "update-ca-certificates" in refused.stderr
    assert system.read_text() == "# the system's roots\n"


def test_trust_ca_system_wide_advice_quotes_the_ca_path(tmp_path: Path) -> None:
    """The `sudo cp CA ...` it advises was printed unquoted: pasted, a confdir with a space
    made cp copy two wrong files (a setup probe)."""
    import shlex

    conf = tmp_path / "my conf"
    trust.ensure_ca(conf)
    system = tmp_path / "ca-certificates.crt"
    system.write_text("# the system's roots\n")
    python = tmp_path / "debian-python"
    python.write_text(f"#!/bin/sh\necho {system}\n")
    python.chmod(0o755)
    refused = trust_ca("--confdir", str(conf), "--python", str(python))
    assert refused.returncode == 2, refused.stderr
    command = refused.stderr.split("(on Debian: ", 1)[1].split(" && ", 1)[0]
    assert shlex.split(command) == ["sudo", "cp", str(conf / trust.CA_CERT_NAME), "/usr/local/share/ca-certificates/mitmproxy.crt"]


def test_trust_ca_leaves_a_system_bundle_certifi_links_to_alone(tmp_path: Path) -> None:
    """certifi's cacert.pem may be a link to the system's bundle (a distribution's package):
    the CA went into the file the link named (a setup probe)."""
    system = tmp_path / "etc" / "ca-certificates.crt"
    system.parent.mkdir()
    system.write_text("# the system's roots\n")
    link = tmp_path / "site-packages" / "certifi" / "cacert.pem"
    link.parent.mkdir(parents=True)
    link.symlink_to(system)
    python = tmp_path / "linked-python"
    python.write_text(f"#!/bin/sh\necho {link}\n")
    python.chmod(0o755)
    refused = trust_ca("--confdir", str(tmp_path / "conf"), "--python", str(python))
    assert refused.returncode == 2 and f"(a link to {system})" in refused.stderr, refused.stderr
    assert system.read_text() == "# the system's roots\n" and link.is_symlink()


def test_trust_ca_check_finds_the_ca_put_in_by_hand_and_makes_none(tmp_path: Path) -> None:
    """After the system-wide advice (update-ca-certificates) the CA is in the bundle with
    no block of ours: it was "NOT trusted". And a check with a mistyped --confdir made a
    new CA, private key and all."""
    ca = trust.CACert.load(trust.ensure_ca(tmp_path / "conf"))
    bundle = tmp_path / "ca-certificates.crt"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n" + ca.pem)
    python = tmp_path / "system-python"
    python.write_text(f"#!/bin/sh\necho {bundle}\n")
    python.chmod(0o755)
    checked = trust_ca("--confdir", str(tmp_path / "conf"), "--python", str(python), "--check")
    assert checked.returncode == 0 and checked.stdout.startswith("trusted:"), checked.stdout + checked.stderr
    typo = trust_ca("--confdir", str(tmp_path / "typo"), "--python", str(python), "--check")
    assert typo.returncode == 2 and "no CA certificate at" in typo.stderr and not (tmp_path / "typo").exists()


def test_trust_ca_says_when_requests_reads_another_bundle_here(tmp_path: Path) -> None:
    """requests takes REQUESTS_CA_BUNDLE (then CURL_CA_BUNDLE) over certifi: with one set,
    as many machines and corporate shells do, trust-ca said "added" and "trusted" while
    requests went on failing with CERTIFICATE_VERIFY_FAILED (a probe on a fresh venv)."""
    certifi_pem = tmp_path / "certifi" / "cacert.pem"
    certifi_pem.parent.mkdir()
    certifi_pem.write_text("# certifi's roots\n")
    python = tmp_path / "app-python"
    python.write_text(f"#!/bin/sh\necho {certifi_pem}\n")
    python.chmod(0o755)
    args = [sys.executable, str(TRUST_CA), "--confdir", str(tmp_path / "conf"), "--python", str(python)]
    clean = {k: v for k, v in os.environ.items() if k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")}
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        env = {**clean, variable: "/etc/ssl/certs/ca-certificates.crt"}
        for extra in ((), ("--check",)):
            said = subprocess.run([*args, *extra], env=env, capture_output=True, text=True, timeout=60)
            assert said.returncode == 0, said.stdout + said.stderr
            assert f"{variable}=/etc/ssl/certs/ca-certificates.crt is set" in said.stdout, said.stdout
    for env in (clean, {**clean, "REQUESTS_CA_BUNDLE": str(certifi_pem)}):  # none, or certifi's own file: nothing to say
        quiet = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        assert quiet.returncode == 0 and "CA_BUNDLE" not in quiet.stdout, quiet.stdout


def test_trust_writes_are_whole_or_not_at_all(tmp_path: Path) -> None:
    """A full disk part way through must leave cacert.pem (and an old bundle) as they were."""
    conf = tmp_path / "conf"
    ca = trust.CACert.load(trust.ensure_ca(conf))
    folder = tmp_path / "certifi"
    folder.mkdir()
    bundle, old_bundle = folder / "cacert.pem", folder / "bundle.pem"
    original = b"# roots\n" + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n" * 20
    bundle.write_bytes(original)
    older = b"# roots\n" + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n" + b"# mitmproxy CA sha256=" + b"0" * 64 + b"\n"
    old_bundle.write_bytes(older + b"-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n")  # one write_bundle wrote
    for path in (bundle, old_bundle):
        path.chmod(0o640)
    code = (
        "from pathlib import Path; from llm_mitm import trust\n"
        f"ca = trust.CACert.load(Path({str(ca.path)!r}))\n"
        f"for write in (lambda: trust.add(Path({str(bundle)!r}), ca), lambda: trust.write_bundle(Path({str(old_bundle)!r}), ca)):\n"
        "    try:\n        write()\n    except trust.TrustError as exc:\n        print(exc)\n"
    )
    result = with_file_size_limit(len(original) + 100, code)
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [f"cannot write {bundle}", f"cannot write {old_bundle}"]
    assert "File too large" in result.stdout
    assert bundle.read_bytes() == original and old_bundle.read_bytes().startswith(older)
    assert sorted(p.name for p in folder.iterdir()) == ["bundle.pem", "cacert.pem"]  # no temporary file left
    # With room to write, the files keep their permissions, and a symlinked bundle stays a link.
    link = folder / "link.pem"
    link.symlink_to(bundle.name)
    assert trust.add(link, ca) and link.is_symlink() and trust.is_trusted(bundle, ca)
    trust.write_bundle(old_bundle, ca)
    for path in (bundle, old_bundle):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert trust.remove(link) and bundle.read_bytes() == original


def test_a_bundle_is_written_over_only_a_bundle_written_before(tmp_path: Path) -> None:
    """`--bundle F` replaced whatever F held (a notes file, a review) with a PEM bundle, for
    trust-ca and `llm-mitm env` alike: now refused in one line, F untouched. A bundle written
    before is still refreshed (env does at each run, and must take a new CA)."""
    notes = tmp_path / "notes.txt"
    for held in (b"my notes\n", b"\xff\xfe binary", b"notes\n# mitmproxy CA sha256=" + b"0" * 64 + b"\n-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n"):
        notes.write_bytes(held)
        env = subprocess.run([sys.executable, "-m", "llm_mitm", "env", "--confdir", str(tmp_path / "conf"), "--bundle", str(notes)],
                             capture_output=True, text=True, timeout=60)
        for result, tool in ((trust_ca("--confdir", str(tmp_path / "conf"), "--bundle", str(notes)), "trust-ca"), (env, "llm-mitm env")):
            assert result.returncode == 2 and result.stdout == "", result.stdout
            assert result.stderr == f"{tool}: {notes} exists and is not a bundle written by llm-mitm: left as it is (name a new file with --bundle)\n"
            assert notes.read_bytes() == held
    first, second = (trust.CACert.load(trust.ensure_ca(tmp_path / name)) for name in ("conf", "other"))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(b"")  # made empty beforehand (mktemp): nothing to lose
    for ca in (first, first, second):
        assert trust.write_bundle(bundle, ca) == bundle and trust.is_trusted(bundle, ca)
    assert not trust.is_trusted(bundle, first)
    assert environment.prepare_bundle(tmp_path / "conf", bundle) == bundle and trust.is_trusted(bundle, first)


def test_trust_ca_bundle_is_quoted_for_the_shell(tmp_path: Path) -> None:
    target = tmp_path / "dir with space" / "it's $HOME.pem"
    result = trust_ca("--confdir", str(tmp_path / "conf"), "--bundle", str(target))
    assert result.returncode == 0, result.stderr
    shell = subprocess.run(["bash", "-c", result.stdout + 'printf "%s\\n" "$SSL_CERT_FILE" "$REQUESTS_CA_BUNDLE" "$NODE_EXTRA_CA_CERTS"'],
                           capture_output=True, text=True, timeout=30)
    assert shell.returncode == 0 and shell.stderr == "", shell.stderr
    assert shell.stdout.splitlines() == [str(target)] * 3
    assert target.is_file()


def test_remove_restores_a_file_without_final_newline(tmp_path: Path) -> None:
    ca = trust.CACert.load(trust.ensure_ca(tmp_path / "conf"))
    bundle = tmp_path / "cacert.pem"
    original = b"# roots\r\n-----BEGIN CERTIFICATE-----\r\nAAAA\r\n-----END CERTIFICATE-----"
    bundle.write_bytes(original)
    assert trust.add(bundle, ca) and trust.is_trusted(bundle, ca)
    assert trust.remove(bundle)
    assert bundle.read_bytes() == original
    assert not trust.remove(bundle)


def test_a_bundle_that_is_not_utf8_is_trusted_and_given_back_byte_for_byte(tmp_path: Path) -> None:
    """A bundle with a Latin-1 comment (OpenSSL reads it; a corporate tool's export) ended
    add, --check, --remove and --bundle alike in a UnicodeDecodeError (a setup probe)."""
    ca = trust.CACert.load(trust.ensure_ca(tmp_path / "conf"))
    bundle = tmp_path / "certifi" / "cacert.pem"
    bundle.parent.mkdir()
    original = b"# Issuer: CN=F\xf5tan\xfas\xedtv\xe1ny\n" + trust.ensure_ca(tmp_path / "other").read_bytes()
    bundle.write_bytes(original)
    python = tmp_path / "app-python"
    python.write_text(f"#!/bin/sh\necho {bundle}\n")
    python.chmod(0o755)
    target = ["--confdir", str(tmp_path / "conf"), "--python", str(python)]
    assert trust_ca(*target, "--check").returncode == 1
    added = trust_ca(*target)
    assert added.returncode == 0 and added.stdout.startswith("added"), added.stderr
    assert trust.is_trusted(bundle, ca) and bundle.read_bytes().startswith(original)
    separate = trust_ca(*target, "--bundle", str(tmp_path / "bundle.pem"))
    assert separate.returncode == 0 and (tmp_path / "bundle.pem").read_bytes().startswith(original), separate.stderr
    removed = trust_ca(*target, "--remove")
    assert removed.returncode == 0 and bundle.read_bytes() == original, removed.stderr


def test_remove_keeps_a_certificate_another_tool_appended_after_ours_loadable(tmp_path: Path) -> None:
    """The newline `add` put after a last line that had none stays when something follows
    our block (a probe: the next certificate's BEGIN was glued to our END line)."""
    ssl = pytest.importorskip("ssl")
    ca = trust.CACert.load(trust.ensure_ca(tmp_path / "conf"))
    other = trust.ensure_ca(tmp_path / "conf2").read_bytes()
    bundle = tmp_path / "cacert.pem"
    bundle.write_bytes(trust.ensure_ca(tmp_path / "conf3").read_bytes().rstrip(b"\n"))  # a last line without its newline
    assert trust.add(bundle, ca)
    bundle.write_bytes(bundle.read_bytes() + other)
    assert trust.remove(bundle) and not trust.is_trusted(bundle, ca)
    assert len(ssl.create_default_context(cafile=str(bundle)).get_ca_certs()) == 2


# --------------------------------------------------------------------------- system proxy


class FakeRegistry:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = dict(values)
        self.calls: list[tuple[str, ...]] = []

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def set(self, name: str, value: Any) -> None:
        self.calls.append(("set", name, str(value)))
        self.values[name] = value

    def delete(self, name: str) -> None:
        self.calls.append(("delete", name))
        self.values.pop(name, None)


class FakeGsettings:
    def __init__(self) -> None:
        self.values = {
            "org.gnome.system.proxy mode": "'auto'",
            "org.gnome.system.proxy autoconfig-url": "'http://wpad/wpad.dat'",
            "org.gnome.system.proxy ignore-hosts": "['localhost', '127.0.0.0/8', '::1']",
            "org.gnome.system.proxy.http host": "''",
            "org.gnome.system.proxy.http port": "0",
            "org.gnome.system.proxy.https host": "'corp-proxy'",
            "org.gnome.system.proxy.https port": "3128",
        }
        self.calls: list[list[str]] = []

    def __call__(self, args: Sequence[str]) -> str:
        self.calls.append(list(args))
        assert args[0] == "gsettings"
        key = f"{args[2]} {args[3]}"
        if args[1] == "get":
            return self.values[key] + "\n"
        self.values[key] = args[4]
        return ""


class FakeNetworksetup:
    """Just enough of macOS's networksetup to keep per-service state."""

    def __init__(self) -> None:
        self.state = {
            "Wi-Fi": {"web": ["No", "", "0"], "secure": ["Yes", "corp", "3128"], "auto": ["(null)", "No"], "bypass": ["*.corp"]},
            "Ethernet": {"web": ["No", "", "0"], "secure": ["No", "", "0"], "auto": ["http://pac/p.pac", "Yes"], "bypass": []},
        }
        self.calls: list[list[str]] = []

    def __call__(self, args: Sequence[str]) -> str:
        self.calls.append(list(args))
        verb, rest = args[1], list(args[2:])
        if verb == "-listallnetworkservices":
            return "An asterisk (*) denotes that a network service is disabled.\nWi-Fi\nEthernet\n*Bluetooth PAN\n"
        service = self.state[rest[0]]
        kind = "secure" if "secure" in verb else "web"
        if verb in ("-getwebproxy", "-getsecurewebproxy"):
            enabled, server, port = service[kind]
            return f"Enabled: {enabled}\nServer: {server}\nPort: {port}\nAuthenticated Proxy Enabled: 0\n"
        if verb == "-getautoproxyurl":
            return f"URL: {service['auto'][0]}\nEnabled: {service['auto'][1]}\n"
        if verb == "-getproxybypassdomains":
            return "\n".join(service["bypass"]) + "\n" if service["bypass"] else f"There aren't any bypass domains set on {rest[0]}.\n"
        if verb in ("-setwebproxy", "-setsecurewebproxy"):
            service[kind] = ["Yes", rest[1], rest[2]]
        elif verb in ("-setwebproxystate", "-setsecurewebproxystate"):
            service[kind][0] = "Yes" if rest[1] == "on" else "No"
        elif verb == "-setproxybypassdomains":
            service["bypass"] = [] if rest[1:] == ["Empty"] else rest[1:]
        elif verb == "-setautoproxyurl":
            service["auto"][0] = rest[1]
        elif verb == "-setautoproxystate":
            service["auto"][1] = "Yes" if rest[1] == "on" else "No"
        else:
            raise AssertionError(verb)
        return ""


def round_trip(backend: Any, current: Any, tmp_path: Path) -> list[str]:
    """start, start again, stop, stop again; the state must end as it began."""
    import copy

    original = copy.deepcopy(current())
    switch = sysproxy.SystemProxy(backend, tmp_path / "state.json")
    messages = [switch.start(port=8081)]
    assert current() != original
    started = copy.deepcopy(current())
    messages.append(switch.start(port=8081))
    assert current() == started
    saved = orjson.loads((tmp_path / "state.json").read_bytes())
    assert saved["backend"] == backend.name
    messages.append(switch.stop())
    assert current() == original
    messages.append(switch.stop())
    assert "nothing to restore" in messages[-1]
    return messages


def test_windows_registry_round_trip(tmp_path: Path) -> None:
    registry = FakeRegistry({"ProxyEnable": 0, "ProxyServer": "corp:3128", "AutoConfigURL": "http://wpad/wpad.dat"})
    refreshes: list[int] = []
    backend = sysproxy.WindowsBackend(registry, refresh=lambda: refreshes.append(1))
    switch = sysproxy.SystemProxy(backend, tmp_path / "state.json")
    switch.start(port=8081)
    assert registry.values == {"ProxyEnable": 1, "ProxyServer": "127.0.0.1:8081", "ProxyOverride": "<local>;localhost;127.*"}
    assert len(refreshes) == 1
    switch.stop()
    assert registry.values == {"ProxyEnable": 0, "ProxyServer": "corp:3128", "AutoConfigURL": "http://wpad/wpad.dat"}
    assert ("delete", "ProxyOverride") in registry.calls  # it was absent before: absent again
    round_trip(sysproxy.WindowsBackend(registry, refresh=lambda: None), lambda: registry.values, tmp_path / "again")


def test_the_powershell_scripts_snapshot_is_stopped_by_python_unless_it_holds_winhttp(tmp_path: Path) -> None:
    """One state file for both tools (each said "not started" of what the other started and
    left the proxy on): ConvertTo-Json's form of the script's snapshot, read by Python."""
    registry = FakeRegistry({"ProxyEnable": 1, "ProxyServer": "127.0.0.1:8080"})
    switch = sysproxy.SystemProxy(sysproxy.WindowsBackend(registry, refresh=lambda: None), tmp_path / "llm-mitm-sysproxy.json")
    written_by_script = {"backend": "windows", "settings": {"ProxyEnable": 0, "ProxyServer": "corp:3128", "ProxyOverride": None, "AutoConfigURL": None}}
    switch.state_file.write_text(json.dumps(written_by_script, indent=4), encoding="utf-8-sig")  # Set-Content -Encoding UTF8 writes a BOM
    assert "restored" in switch.stop()
    assert registry.values == {"ProxyEnable": 0, "ProxyServer": "corp:3128"} and not switch.state_file.exists()
    switch.state_file.write_text(json.dumps({**written_by_script, "winhttp": {"WinHttpSettings": None}}), encoding="utf-8")
    with pytest.raises(sysproxy.StateError, match="stop it with that script, which restores WinHTTP too"):
        switch.stop()
    assert switch.state_file.exists()


def test_gnome_round_trip(tmp_path: Path) -> None:
    fake = FakeGsettings()
    messages = round_trip(sysproxy.GnomeBackend(fake), lambda: fake.values, tmp_path)
    assert "already on" in messages[1]
    assert ["gsettings", "set", "org.gnome.system.proxy", "mode", "'manual'"] in fake.calls
    assert ["gsettings", "set", "org.gnome.system.proxy.https", "port", "8081"] in fake.calls


def test_macos_round_trip(tmp_path: Path) -> None:
    fake = FakeNetworksetup()
    round_trip(sysproxy.MacBackend(fake), lambda: fake.state, tmp_path)
    assert ["networksetup", "-setsecurewebproxy", "Wi-Fi", "127.0.0.1", "8081"] in fake.calls
    assert not any("Bluetooth PAN" in call for call in fake.calls)


def test_sysproxy_says_in_one_line_what_a_failing_command_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """gsettings with no desktop's schemas ended `status` in a traceback, its own message lost
    (a setup probe); a port of 99999 was written into Windows' proxy setting."""
    def no_schemas(args: list[str]) -> str:
        raise subprocess.CalledProcessError(1, args, "", "No such schema \u201corg.gnome.system.proxy\u201d\n")

    state = ["--state", str(tmp_path / "state.json")]
    assert sysproxy.main(["status", *state], backend=sysproxy.GnomeBackend(no_schemas)) == 2
    said = capsys.readouterr().err
    assert said == "sysproxy: gsettings get org.gnome.system.proxy mode failed: No such schema \u201corg.gnome.system.proxy\u201d\n", said
    registry = FakeRegistry({"ProxyEnable": 0})
    with pytest.raises(SystemExit) as usage:
        sysproxy.main(["start", "--port", "99999", *state], backend=sysproxy.WindowsBackend(registry, refresh=lambda: None))
    assert usage.value.code == 2 and "--port: 99999 is no TCP port (1-65535)" in capsys.readouterr().err
    assert registry.values == {"ProxyEnable": 0} and not (tmp_path / "state.json").exists()
    (tmp_path / "state.json").write_text(json.dumps({"backend": "gnome", "settings": {"org.gnome.system.proxy mode": "'none'"}}))
    assert sysproxy.main(["stop", *state], backend=sysproxy.WindowsBackend(registry, refresh=lambda: None)) == 2  # another system's settings
    assert "holds gnome's settings, not windows'" in capsys.readouterr().err and (tmp_path / "state.json").exists()


def test_sysproxy_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeGsettings()
    state = ["--state", str(tmp_path / "s.json")]
    assert sysproxy.main(["start", "--port", "9000", "--bypass", "a.test", "b.test", *state], backend=sysproxy.GnomeBackend(fake)) == 0
    assert fake.values["org.gnome.system.proxy ignore-hosts"] == "['a.test', 'b.test']"
    assert sysproxy.main(["status", *state], backend=sysproxy.GnomeBackend(fake)) == 0
    assert "on (started by llm-mitm)" in capsys.readouterr().out
    assert sysproxy.main(["stop", *state], backend=sysproxy.GnomeBackend(fake)) == 0
    assert fake.values["org.gnome.system.proxy mode"] == "'auto'"


UNREADABLE_STATES = [b"", b'{"backend": "gno', b"[]", b'{"backend": "gnome"}', b"\xff\xfe"]


@pytest.mark.parametrize("content", UNREADABLE_STATES)
def test_unreadable_state_file_is_never_taken_for_the_saved_settings(content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It holds the only copy of the user's own settings: start and stop refuse, and say what to do."""
    fake = FakeGsettings()
    before = dict(fake.values)
    state = tmp_path / "state.json"
    state.write_bytes(content)
    switch = sysproxy.SystemProxy(sysproxy.GnomeBackend(fake), state)
    for action in (switch.start, switch.stop):
        with pytest.raises(sysproxy.StateError, match=r"cannot be read from .*state\.json .* by hand, then delete that file"):
            action()
    assert fake.values == before and not any(call[1] == "set" for call in fake.calls)
    assert state.read_bytes() == content
    for action in ("start", "stop"):
        assert sysproxy.main([action, "--state", str(state)], backend=sysproxy.GnomeBackend(fake)) == 2
        err = capsys.readouterr().err
        assert err.startswith("sysproxy: the settings saved before `start` cannot be read") and err.count("\n") == 1
    assert fake.values == before


def test_a_start_that_cannot_save_changes_nothing(tmp_path: Path) -> None:
    """A full disk on the first start: no (empty) state file is left for the retry to trust."""
    state = tmp_path / "state" / "state.json"
    code = (
        "import sys; from llm_mitm import sysproxy; from tests.test_setup_helpers import FakeGsettings\n"
        "fake = FakeGsettings(); before = dict(fake.values)\n"
        f"code = sysproxy.main(['start', '--state', {str(state)!r}], backend=sysproxy.GnomeBackend(fake))\n"
        "print(code, fake.values == before)\n"
    )
    result = with_file_size_limit(0, code)
    assert result.stdout.split() == ["2", "True"], result.stderr
    assert "cannot save the current settings to" in result.stderr and "nothing was changed" in result.stderr
    assert list(state.parent.iterdir()) == []
    fake = FakeGsettings()
    messages = round_trip(sysproxy.GnomeBackend(fake), lambda: fake.values, state.parent)
    assert "already on" not in messages[0]


# --------------------------------------------------------------------------- PowerShell


def powershell_errors(source: bytes) -> list[str]:
    import tree_sitter_powershell
    from tree_sitter import Language, Parser

    tree = Parser(Language(tree_sitter_powershell.language())).parse(source)
    found: list[str] = []

    def walk(node: Any) -> None:
        if node.type == "ERROR" or node.is_missing:
            found.append(f"line {node.start_point[0] + 1}: {source[node.start_byte:node.end_byte][:60]!r}")
        for child in node.children:
            walk(child)

    walk(tree.root_node)
    return found


def test_powershell_script_parses() -> None:
    source = PS1.read_bytes()
    assert powershell_errors(source) == []
    # The parser does catch a broken script (so the check above means something).
    assert powershell_errors(source.replace(b"switch ($Action) {", b"switch ($Action {")) != []
    text = source.decode()
    assert text.index("InternetSetOption([IntPtr]::Zero, 39") < text.index("InternetSetOption([IntPtr]::Zero, 37")
    for name in ("ProxyEnable", "ProxyServer", "ProxyOverride", "AutoConfigURL", "'<local>;localhost;127.*'", "netsh winhttp import proxy source=ie"):
        assert name in text
    # One snapshot for both tools, in llm_mitm.sysproxy's place and format, and WinHTTP put
    # back as it was (stop re-imported the WinINet settings into it).
    assert "Join-Path $HOME '.mitmproxy'" in text and f"'{sysproxy.DEFAULT_STATE.name}'" in text
    assert "backend  = 'windows'" in text and "settings = Get-ProxyValues" in text and "$saved.settings.$name" in text
    stop = text[text.index("function Stop-Interception"):text.index("function Show-Status")]
    assert "netsh" not in stop and "Restore-WinHttpSettings $saved.winhttp.WinHttpSettings" in stop
    # A second start with -WinHttp, after one without, saves WinHTTP before importing into it
    # (a setup probe: stop left WinHTTP on a proxy that was gone).
    start = text[text.index("function Start-Interception"):text.index("function Stop-Interception")]
    assert start.index("Add-WinHttpToSaved") < start.index("netsh winhttp import proxy source=ie")
    assert "-NotePropertyName 'winhttp'" in text[text.index("function Add-WinHttpToSaved"):text.index("function Restore-WinHttpSettings")]
    assert "InternetExplorer.Application" not in text


def test_powershell_winhttp_start_fails_loudly_without_an_administrator() -> None:
    """`start -WinHttp` not run as an administrator piped netsh's "Access is denied" into
    Out-Null and reported the proxy on: WinHTTP clients still went direct (a setup probe,
    read from the script: no PowerShell here)."""
    text = PS1.read_text()
    start = text[text.index("function Start-Interception"):text.index("function Stop-Interception")]
    check = start.index("if ($WinHttp -and -not (Test-Administrator))")
    assert check < start.index("Save-ProxyValues") and check < start.index("Set-ProxyValue")
    assert "function Test-Administrator" in text and "WindowsBuiltInRole]::Administrator" in text
    netsh = start[start.index("netsh winhttp import proxy source=ie"):]
    assert not netsh.splitlines()[0].rstrip().endswith("Out-Null")
    assert netsh.index("$LASTEXITCODE -ne 0") < netsh.index("throw") < netsh.index("Write-Output")
    assert powershell_errors(text.encode()) == []


# --------------------------------------------------------------------------- llm-mitm env


def test_env_names_the_bundle_by_its_absolute_path(tmp_path: Path) -> None:
    """A relative --confdir or --bundle was printed as given: a client started in another
    directory found no bundle (a setup probe)."""
    for args, bundle in ((["--confdir", "conf"], tmp_path / "conf" / "llm-mitm-bundle.pem"),
                         (["--confdir", "conf", "--bundle", "b.pem"], tmp_path / "b.pem")):
        result = subprocess.run([sys.executable, "-m", "llm_mitm", "env", *args], capture_output=True, text=True,
                                timeout=60, check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
        assert f"export SSL_CERT_FILE='{bundle}'" in result.stdout.splitlines() and bundle.is_file()


@pytest.mark.parametrize(
    ("shell", "line"),
    [
        ("bash", "export HTTPS_PROXY='http://127.0.0.1:8080'"),
        ("fish", "set -gx HTTPS_PROXY 'http://127.0.0.1:8080'"),
        ("powershell", "$env:HTTPS_PROXY = 'http://127.0.0.1:8080'"),
        ("cmd", 'set "HTTPS_PROXY=http://127.0.0.1:8080"'),
    ],
)
def test_env_shells(shell: str, line: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llm_mitm", "env", "--shell", shell, "--confdir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert line in result.stdout.splitlines()
    for name in ("HTTP_PROXY", "NO_PROXY", "OPENAI_PROXY", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
                 "NODE_USE_ENV_PROXY"):
        assert name in result.stdout
    # curl reads http_proxy only in lower case; on Windows the two names are one variable
    assert ("http_proxy" in result.stdout) == (shell in ("bash", "fish") or (shell == "powershell" and sys.platform != "win32"))
    for unsafe in ("NODE_TLS_REJECT_UNAUTHORIZED", "PYTHONHTTPSVERIFY", "CURL_INSECURE", "=0\n"):
        assert unsafe not in result.stdout
    assert str(tmp_path / environment.BUNDLE_NAME) in result.stdout


@pytest.mark.parametrize(("host", "url"), [("::1", "http://[::1]:8080"), ("[::1]", "http://[::1]:8080"), ("localhost", "http://localhost:8080"),
                                         ("fe80::1%eth0", "http://[fe80::1%25eth0]:8080"), ("10.0.0.7", "http://10.0.0.7:8080"),
                                         ("proxy.corp.example.", "http://proxy.corp.example.:8080")])
def test_env_writes_an_ipv6_proxy_address_in_brackets(host: str, url: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "llm_mitm", "env", "--host", host, "--confdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, check=True)
    assert f"export HTTPS_PROXY='{url}'" in result.stdout.splitlines()


@pytest.mark.parametrize("host", ["http://x", "proxy host", "-lead.example", "a..b", "[not-an-address]", ""])
def test_env_refuses_a_host_no_url_can_hold(host: str, tmp_path: Path) -> None:
    """It went into every client's proxy URL as given (`http://[http://x]:8080`), exit 0 (a setup probe)."""
    result = subprocess.run([sys.executable, "-m", "llm_mitm", "env", f"--host={host}", "--confdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "is no host name or IP address" in result.stderr and "PROXY" not in result.stdout, result


NASTY_VALUES = ["plain", "it's", "C:\\dir\\", "a\\'b", "\\\\'", "$HOME `id` $(id) \\n", "a b&c|d<e>f^g", "‘smart’ ‚quotes‛", "line\nbreak", ""]


def fish_single_quoted(text: str) -> str:
    """What fish makes of one single-quoted word, by its documented rules: inside single
    quotes only \\\\ and \\' are escapes; any other backslash is literal."""
    assert text[0] == "'" and text[-1] == "'", text
    out, i, body = [], 0, text[1:-1]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body) and body[i + 1] in "\\'":
            out.append(body[i + 1])
            i += 2
        else:
            assert body[i] != "'", f"the quote closes early in {text!r}"
            out.append(body[i])
            i += 1
    return "".join(out)


def powershell_single_quoted(text: str) -> str:
    """PowerShell's rules: the four single-quote characters count alike, doubled inside."""
    quotes = "'\u2018\u2019\u201a\u201b"
    assert text[0] in quotes and text[-1] in quotes, text
    out, i, body = [], 0, text[1:-1]
    while i < len(body):
        if body[i] in quotes:
            assert i + 1 < len(body) and body[i + 1] in quotes, f"the quote closes early in {text!r}"
            i += 1
        out.append(body[i])
        i += 1
    return "".join(out)


@pytest.mark.parametrize("value", NASTY_VALUES)
def test_env_values_come_back_unchanged_in_each_shell(value: str) -> None:
    variables = {"LLM_MITM_VALUE": value}
    bash = subprocess.run(["bash", "-c", environment.render(variables, "bash") + '\nprintf "%s" "$LLM_MITM_VALUE"'],
                          capture_output=True, text=True, timeout=30)
    assert (bash.returncode, bash.stdout) == (0, value), bash.stderr
    fish_line = environment.render(variables, "fish")
    assert fish_line.startswith("set -gx LLM_MITM_VALUE ")
    assert fish_single_quoted(fish_line.removeprefix("set -gx LLM_MITM_VALUE ")) == value
    if shutil.which("fish"):
        fish = subprocess.run(["fish", "-c", fish_line + '; printf "%s" "$LLM_MITM_VALUE"'], capture_output=True, text=True, timeout=30)
        assert fish.stdout == value, fish.stderr
    powershell = environment.render(variables, "powershell")
    assert powershell_single_quoted(powershell.removeprefix("$env:LLM_MITM_VALUE = ")) == value
    assert powershell_errors(powershell.encode()) == []
    if "\n" not in value:
        assert environment.render(variables, "cmd") == f'set "LLM_MITM_VALUE={value}"'


def test_env_cmd_refuses_what_cmd_cannot_set_literally(tmp_path: Path) -> None:
    """cmd expands %NAME% when typed and takes %% as % only in a batch file: no line is right for both."""
    for value in ("a b&c %USERPROFILE%", 'say "hi"', "two\nlines"):
        with pytest.raises(environment.UnsafeValue, match="cmd cannot set V"):
            environment.render({"V": value}, "cmd")
    bundle = tmp_path / "a b&c %USERPROFILE%" / "bundle.pem"
    result = subprocess.run([sys.executable, "-m", "llm_mitm", "env", "--shell", "cmd", "--confdir", str(tmp_path / "conf"), "--bundle", str(bundle)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("llm-mitm env: cmd cannot set SSL_CERT_FILE") and result.stderr.count("\n") == 1
    ok = subprocess.run([sys.executable, "-m", "llm_mitm", "env", "--shell", "cmd", "--confdir", str(tmp_path / "conf"), "--bundle", str(tmp_path / "a b&c" / "b.pem")],
                        capture_output=True, text=True, timeout=60, check=True)
    assert f'set "SSL_CERT_FILE={tmp_path / "a b&c" / "b.pem"}"' in ok.stdout.splitlines()


def test_env_output_drives_a_real_client(proxy: Mitmdump) -> None:
    """eval the printed lines, then run the openai SDK: it goes through the proxy and
    trusts it, with nothing else set."""
    from tests.support.clients import DRIVER, client_python

    m = marker()
    action = orjson.dumps({"client": "openai", "op": "chat", "api_key": OPENAI_KEY, "params": chat(m)}).decode()
    llm_mitm = Path(sys.executable).with_name("llm-mitm")
    script = f'eval "$({llm_mitm} env --port {proxy.port} --confdir {proxy.confdir})" && {client_python()} {DRIVER}'
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    result = subprocess.run(["bash", "-c", script], input=action, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["text"] == CANNED_REPLY
    assert trace_with(proxy, m)["status_code"] == 200


def test_env_output_sends_curl_through_the_proxy_for_http_and_https(proxy: Mitmdump) -> None:
    """curl takes an http:// proxy only from `http_proxy` and its CA from `CURL_CA_BUNDLE`
    before `SSL_CERT_FILE`: a plain-http call must not go direct (key in clear, untraced),
    nor an https one fail on a CURL_CA_BUNDLE already set."""
    llm_mitm = Path(sys.executable).with_name("llm-mitm")
    markers = {scheme: marker() for scheme in ("http", "https")}
    calls = " && ".join(
        f"curl -sS --fail-with-body {scheme}://api.openai.com/v1/chat/completions -H 'Authorization: Bearer {OPENAI_KEY}'"
        f" -H 'Content-Type: application/json' -d '{orjson.dumps(chat(m)).decode()}'"
        for scheme, m in markers.items()
    )
    script = f'eval "$({llm_mitm} env --port {proxy.port} --confdir {proxy.confdir})" && {calls}'
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "CURL_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt"}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(CANNED_REPLY) == 2
    for m in markers.values():
        assert trace_with(proxy, m)["status_code"] == 200


class MemoryBackendGsettings(FakeGsettings):
    """gsettings without a session bus: each process writes to a memory backend of its
    own, so a `set` succeeds and the next `get` sees nothing of it."""

    def __call__(self, args: Sequence[str]) -> str:
        if args[1] == "set":
            self.calls.append(list(args))
            return ""
        return super().__call__(args)


def test_a_gnome_start_that_does_not_take_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = MemoryBackendGsettings()
    state = tmp_path / "state.json"
    assert sysproxy.main(["start", "--state", str(state)], backend=sysproxy.GnomeBackend(fake)) == 2
    err = capsys.readouterr().err
    assert "gsettings did not keep the setting" in err and "'auto'" in err and "D-Bus" in err
    assert not state.exists()  # nothing to restore: a later start saves the settings afresh

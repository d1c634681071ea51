"""Point the desktop's system proxy at llm-mitm, and put back exactly what was there.

    python -m llm_mitm.sysproxy start [--port 8080] [--bypass HOST ...]
    python -m llm_mitm.sysproxy stop
    python -m llm_mitm.sysproxy status

Windows through the registry (winreg) and WinINet's refresh, macOS through
`networksetup`, GNOME through `gsettings`. `start` saves the settings it finds (once:
starting twice keeps the first snapshot) and `stop` restores that snapshot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llm_mitm.arguments import port_number
from llm_mitm.atomic import write_atomic

DEFAULT_STATE = Path("~/.mitmproxy/llm-mitm-sysproxy.json")


@dataclass(frozen=True)
class ProxySettings:
    host: str
    port: int
    bypass: tuple[str, ...]


class Backend(Protocol):
    name: str
    default_bypass: tuple[str, ...]

    def snapshot(self) -> dict[str, Any]: ...
    def apply(self, settings: ProxySettings) -> None: ...
    def restore(self, snapshot: dict[str, Any]) -> None: ...


Runner = Callable[[Sequence[str]], str]


def run_command(args: Sequence[str]) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True).stdout


# --------------------------------------------------------------------------- Windows


class Registry(Protocol):
    """The values of HKCU\\...\\Internet Settings: value or None when absent."""

    def get(self, name: str) -> Any: ...
    def set(self, name: str, value: Any) -> None: ...
    def delete(self, name: str) -> None: ...


class WinReg:  # pragma: no cover - exercised on Windows only
    KEY = r"Software\Microsoft\Windows\CurrentVersion\Internet Settings"

    def __init__(self) -> None:
        import winreg  # type: ignore[import-not-found]

        self.winreg = winreg

    def get(self, name: str) -> Any:
        with self.winreg.OpenKey(self.winreg.HKEY_CURRENT_USER, self.KEY) as key:
            try:
                return self.winreg.QueryValueEx(key, name)[0]
            except FileNotFoundError:
                return None

    def set(self, name: str, value: Any) -> None:
        kind = self.winreg.REG_DWORD if isinstance(value, int) else self.winreg.REG_SZ
        with self.winreg.OpenKey(self.winreg.HKEY_CURRENT_USER, self.KEY, 0, self.winreg.KEY_SET_VALUE) as key:
            self.winreg.SetValueEx(key, name, 0, kind, value)

    def delete(self, name: str) -> None:
        with self.winreg.OpenKey(self.winreg.HKEY_CURRENT_USER, self.KEY, 0, self.winreg.KEY_SET_VALUE) as key:
            try:
                self.winreg.DeleteValue(key, name)
            except FileNotFoundError:
                pass


def wininet_refresh() -> None:  # pragma: no cover - Windows only
    """INTERNET_OPTION_SETTINGS_CHANGED (39) then INTERNET_OPTION_REFRESH (37)."""
    import ctypes

    internet_set_option = ctypes.windll.wininet.InternetSetOptionW  # type: ignore[attr-defined]
    internet_set_option(0, 39, 0, 0)
    internet_set_option(0, 37, 0, 0)


class WindowsBackend:
    name = "windows"
    default_bypass = ("<local>", "localhost", "127.*")
    VALUES = ("ProxyEnable", "ProxyServer", "ProxyOverride", "AutoConfigURL")

    def __init__(self, registry: Registry | None = None, refresh: Callable[[], None] | None = None) -> None:
        self.registry = registry or WinReg()
        self.refresh = refresh or wininet_refresh

    def snapshot(self) -> dict[str, Any]:
        return {name: self.registry.get(name) for name in self.VALUES}

    def apply(self, settings: ProxySettings) -> None:
        self.registry.set("ProxyEnable", 1)
        self.registry.set("ProxyServer", f"{settings.host}:{settings.port}")
        self.registry.set("ProxyOverride", ";".join(settings.bypass))
        self.registry.delete("AutoConfigURL")  # a PAC file would win over the manual proxy
        self.refresh()

    def restore(self, snapshot: dict[str, Any]) -> None:
        for name in self.VALUES:
            value = snapshot.get(name)
            if value is None:
                self.registry.delete(name)
            else:
                self.registry.set(name, value)
        self.refresh()


# --------------------------------------------------------------------------- GNOME


class GnomeBackend:
    name = "gnome"
    default_bypass = ("localhost", "127.0.0.0/8", "::1")
    KEYS = (
        ("org.gnome.system.proxy", "mode"),
        ("org.gnome.system.proxy", "autoconfig-url"),
        ("org.gnome.system.proxy", "ignore-hosts"),
        ("org.gnome.system.proxy.http", "host"),
        ("org.gnome.system.proxy.http", "port"),
        ("org.gnome.system.proxy.https", "host"),
        ("org.gnome.system.proxy.https", "port"),
    )

    def __init__(self, run: Runner = run_command) -> None:
        self.run = run

    def snapshot(self) -> dict[str, Any]:
        """Values as gsettings prints them (GVariant text), which `gsettings set` takes back."""
        return {f"{schema} {key}": self.run(["gsettings", "get", schema, key]).strip() for schema, key in self.KEYS}

    def apply(self, settings: ProxySettings) -> None:
        host = _gvariant_string(settings.host)
        for schema in ("org.gnome.system.proxy.http", "org.gnome.system.proxy.https"):
            self._set(schema, "host", host)
            self._set(schema, "port", str(settings.port))
        self._set("org.gnome.system.proxy", "ignore-hosts", "[" + ", ".join(_gvariant_string(h) for h in settings.bypass) + "]")
        self._set("org.gnome.system.proxy", "mode", "'manual'")
        # Without a session bus gsettings writes to a memory backend of its own process and
        # still succeeds: read the mode back rather than report a proxy that is not on.
        mode = self.run(["gsettings", "get", "org.gnome.system.proxy", "mode"]).strip()
        kept_host = self.run(["gsettings", "get", "org.gnome.system.proxy.https", "host"]).strip() == host
        if mode != "'manual'" or not kept_host:
            raise StateError(f"gsettings did not keep the setting (read back, the proxy mode is {mode}): it has no desktop session to "
                             "write to (no D-Bus session bus?), so nothing was changed; run this inside the desktop session")

    def restore(self, snapshot: dict[str, Any]) -> None:
        for schema, key in self.KEYS:
            value = snapshot.get(f"{schema} {key}")
            if value is not None:
                self._set(schema, key, value)

    def _set(self, schema: str, key: str, value: str) -> None:
        self.run(["gsettings", "set", schema, key, value])


def _gvariant_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --------------------------------------------------------------------------- macOS


class MacBackend:
    name = "macos"
    default_bypass = ("localhost", "127.0.0.1", "*.local", "169.254/16")

    def __init__(self, run: Runner = run_command) -> None:
        self.run = run

    def services(self) -> list[str]:
        lines = self.run(["networksetup", "-listallnetworkservices"]).splitlines()
        return [line for line in lines[1:] if line.strip() and not line.startswith("*")]  # "*": disabled

    def snapshot(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for service in self.services():
            bypass = self.run(["networksetup", "-getproxybypassdomains", service]).splitlines()
            state[service] = {
                "web": _fields(self.run(["networksetup", "-getwebproxy", service])),
                "secure": _fields(self.run(["networksetup", "-getsecurewebproxy", service])),
                "auto": _fields(self.run(["networksetup", "-getautoproxyurl", service])),
                "bypass": [] if any("aren't any" in line for line in bypass) else [b for b in bypass if b.strip()],
            }
        return state

    def apply(self, settings: ProxySettings) -> None:
        for service in self.services():
            self.run(["networksetup", "-setwebproxy", service, settings.host, str(settings.port)])
            self.run(["networksetup", "-setsecurewebproxy", service, settings.host, str(settings.port)])
            self.run(["networksetup", "-setproxybypassdomains", service, *settings.bypass])
            self.run(["networksetup", "-setautoproxystate", service, "off"])

    def restore(self, snapshot: dict[str, Any]) -> None:
        for service, saved in snapshot.items():
            for kind, flag in (("web", "webproxy"), ("secure", "securewebproxy")):
                fields = saved[kind]
                # an empty server is set back too ("" clears it), so the service is as it was
                self.run(["networksetup", f"-set{flag}", service, fields.get("Server", ""), fields.get("Port", "0")])
                self.run(["networksetup", f"-set{flag}state", service, "on" if fields.get("Enabled") == "Yes" else "off"])
            self.run(["networksetup", "-setproxybypassdomains", service, *(saved["bypass"] or ["Empty"])])
            auto = saved["auto"]
            if auto.get("URL") and auto["URL"] != "(null)":
                self.run(["networksetup", "-setautoproxyurl", service, auto["URL"]])
            self.run(["networksetup", "-setautoproxystate", service, "on" if auto.get("Enabled") == "Yes" else "off"])


def _fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out


# --------------------------------------------------------------------------- the switch


class StateError(Exception):
    """The saved settings cannot be read or written; one line that says what to do."""


class SystemProxy:
    """start/stop/status over a backend, with the snapshot kept in a JSON file."""

    def __init__(self, backend: Backend, state_file: Path = DEFAULT_STATE) -> None:
        self.backend = backend
        self.state_file = state_file.expanduser()

    def start(self, host: str = "127.0.0.1", port: int = 8080, bypass: Sequence[str] | None = None) -> str:
        settings = ProxySettings(host, port, tuple(bypass) if bypass else self.backend.default_bypass)
        already = self._saved() is not None
        if not already:
            self._save({"backend": self.backend.name, "settings": self.backend.snapshot()})
        try:
            self.backend.apply(settings)
        except StateError:
            if not already:  # nothing changed: no snapshot to restore later
                self.state_file.unlink(missing_ok=True)
            raise
        note = " (already on; the settings saved before the first start are kept)" if already else ""
        return f"system proxy ({self.backend.name}) -> {host}:{port}, bypass {';'.join(settings.bypass)}{note}"

    def stop(self) -> str:
        saved = self._saved()
        if saved is None:
            return "not started by llm-mitm: nothing to restore"
        if "winhttp" in saved:  # only the PowerShell script (run as an administrator) puts WinHTTP back
            raise StateError("started by scripts/interception-win.ps1 -WinHttp: stop it with that script, which restores WinHTTP too")
        if saved.get("backend") != self.backend.name:  # a home shared between machines: those settings are another system's
            raise StateError(f"{self.state_file} holds {saved.get('backend')}'s settings, not {self.backend.name}'s: stop there, "
                             "or set the proxy here by hand and delete that file")
        self.backend.restore(saved["settings"])
        self.state_file.unlink()
        return f"system proxy ({self.backend.name}) restored"

    def status(self) -> str:
        current = json.dumps(self.backend.snapshot(), indent=2)
        state = "on (started by llm-mitm)" if self.state_file.exists() else "off (not started by llm-mitm)"
        return f"{state}\n{current}"

    def _saved(self) -> dict[str, Any] | None:
        """The snapshot of the first start; None when there is none. One that cannot be read
        stops start and stop alike: it is the only copy of the user's own settings."""
        try:
            saved = json.loads(self.state_file.read_text(encoding="utf-8-sig"))  # PowerShell 5's UTF8 starts with a BOM
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(self._unreadable(str(exc))) from None
        if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
            raise StateError(self._unreadable("no saved settings in it"))
        return saved

    def _unreadable(self, reason: str) -> str:
        return (
            f"the settings saved before `start` cannot be read from {self.state_file} ({reason}), so they cannot be "
            f"put back: set the system proxy as you want it by hand, then delete that file"
        )

    def _save(self, saved: dict[str, Any]) -> None:
        """Whole or not at all: a half-written file would be taken for a saved snapshot."""
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.state_file, json.dumps(saved, indent=2).encode("utf-8"))
        except OSError as exc:
            raise StateError(f"cannot save the current settings to {self.state_file}: {exc.strerror or exc} (nothing was changed)") from None


def detect_backend() -> Backend:
    if sys.platform == "win32":
        return WindowsBackend()
    if sys.platform == "darwin":
        return MacBackend()
    if shutil.which("gsettings") and "GNOME" in os.environ.get("XDG_CURRENT_DESKTOP", "GNOME").upper():
        return GnomeBackend()
    raise SystemExit("sysproxy: no supported desktop found (Windows, macOS, or GNOME with gsettings)")


def main(argv: Sequence[str] | None = None, backend: Backend | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_mitm.sysproxy", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=8080)
    parser.add_argument("--bypass", nargs="+", help="hosts that skip the proxy (default: local addresses)")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="where the saved settings go")
    args = parser.parse_args(argv)
    switch = SystemProxy(backend or detect_backend(), args.state)
    try:
        if args.action == "start":
            print(switch.start(args.host, args.port, args.bypass))
        elif args.action == "stop":
            print(switch.stop())
        else:
            print(switch.status())
    except StateError as exc:
        print(f"sysproxy: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:  # gsettings with no desktop's schemas, networksetup refusing a value
        said = (exc.stderr or "").strip().splitlines()
        print(f"sysproxy: {' '.join(map(str, exc.cmd))} failed: {said[-1] if said else f'exit status {exc.returncode}'}", file=sys.stderr)
        return 2
    except OSError as exc:  # a command that is not there, a state file or registry key it may not touch
        print(f"sysproxy: {exc.filename}: {exc.strerror or exc}" if exc.filename else f"sysproxy: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

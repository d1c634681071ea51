"""The `llm_config` option: load config.yaml, refuse bad edits, follow the file."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from mitmproxy import ctx, exceptions

from llm_mitm.addons.shared import Shared
from llm_mitm.config import DEFAULT_CONFIG_FILE, Config, ConfigError, check_trace_targets, default_config, load_config, resolve_config_path

logger = logging.getLogger("llm_mitm.config")

POLL_SECONDS = 1.0


class Settings:
    """Loads the YAML file named by `llm_config` and reloads it when it changes on disk.

    A bad file at start stops mitmdump (OptionsError); a bad edit later is refused with
    the same one-line message and the last good config stays in force. An edit is read once
    the file has held still for a poll (an editor that empties the file and then writes it,
    caught between the two, would put the built-in defaults, no policy, in force), and a file
    emptied while running (or left with comments only) is refused: `{}` asks for the defaults.
    """

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.path: Path | None = None
        self._awaited: Path | None = None  # ./config.yaml, not there at start: read once it is
        self._stamp: tuple[float, int] | None = None
        self._settling: tuple[float, int] | None = None  # a change seen once, read at the next poll if it holds
        self._watcher: asyncio.Task[None] | None = None
        self._started = False

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option(
            "llm_config",
            str,
            "",
            "llm-mitm config file (YAML). Default: config.yaml in the working directory "
            "when present, else built-in defaults (and config.yaml once it is made). Reloaded when the file changes.",
        )

    def configure(self, updated: set[str]) -> None:
        if "llm_config" not in updated:
            return
        path = resolve_config_path(ctx.options.llm_config)
        awaited = Path.cwd() / DEFAULT_CONFIG_FILE if path is None and not ctx.options.llm_config else None
        stamp = _stamp(path)
        try:
            self._put_in_force(_checked(load_config(path) if path else default_config(), path), path)
        except ConfigError as exc:
            previous = _in_force.get(path)
            if self._started:
                raise exceptions.OptionsError(str(exc)) from None
            if previous is None:
                # At start-up: one line, and mitmdump's error check stops it.
                logger.error("llm-mitm: %s", exc)
                return
            # The script reloaded while the file holds a bad edit: what was in force stays,
            # and the file is still followed, as for an edit made while running.
            logger.error("llm-mitm: config change refused, the previous config stays in force: %s", exc)
            self._put_in_force(previous, path)
        else:
            logger.info("llm-mitm: config %s", path or "built-in defaults")
        self.path, self._stamp, self._awaited = path, stamp, awaited

    def running(self) -> None:
        self._started = True
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                self.reload_if_changed()
            except Exception:  # noqa: BLE001 - the watch outlives any one odd edit
                logger.exception("llm-mitm: reading the changed config failed; the previous config stays in force")

    def reload_if_changed(self) -> bool:
        """Reload after an edit on disk; True when a new config went into force."""
        if self.path is None:
            if self._awaited is None or _stamp(self._awaited) is None:
                return False
            self.path, self._awaited = self._awaited, None  # made since start: read as an edit of the defaults
        stamp = _stamp(self.path)
        if stamp == self._stamp or stamp is None:
            self._settling = None
            return False
        if stamp != self._settling:
            self._settling = stamp
            return False
        self._stamp, self._settling = stamp, None
        try:
            self._put_in_force(_checked(load_config(self.path, allow_empty=False), self.path, self.shared.config), self.path)
        except ConfigError as exc:
            logger.error("llm-mitm: config change refused, the previous config stays in force: %s", exc)
            return False
        logger.info("llm-mitm: reloaded %s", self.path)
        return True

    def _put_in_force(self, config: Config, path: Path | None) -> None:
        """ConfigError, naming the file, when an addon cannot take it (and nothing changed)."""
        try:
            self.shared.apply(config)
        except ConfigError as exc:
            raise ConfigError(f"{path or 'built-in defaults'}: {exc}") from None
        _in_force[path] = config


# The config each file last put in force, kept in this module because mitmproxy reloads the
# script (and builds new addons) without reloading the package.
_in_force: dict[Path | None, Config] = {}


def _checked(config: Config, path: Path | None, previous: Config | None = None) -> Config:
    """The config, once the trace files it names can be written (else ConfigError). On a
    reload only if they changed: a trace directory gone bad must not hold back, say, a
    tighter policy (the writer logs its own losses)."""
    if previous is None or (config.traces.destination, config.traces.directory) != (previous.traces.destination, previous.traces.directory):
        check_trace_targets(config, str(path) if path else None)
    return config


def _stamp(path: Path | None) -> tuple[float, int] | None:
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime, stat.st_size

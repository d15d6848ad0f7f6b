"""The site's SuperNode: Flower's own, running only the apps this site allows.

Flower 1.42's SuperNode installs and runs whatever app (FAB) a run on its SuperLink
brings, with the site's node config (data path, tokenizer, ...) in its context; its only
app check (``--trusted-entities``) accepts hub-signed apps only. This wrapper puts one
check in front: when a message of a new run arrives, the SuperNode fetches the run's FAB
(``get_fab``) and this module computes the SHA-256 of the FAB's bytes itself (never the
hash the SuperLink claims) and compares it with the allowed hashes:

- the hash of the medunic app installed at this site (``installed_app_hash``: FAB builds
  are deterministic, so the same medunic tree gives the same hash at the coordinator);
- any hash the site operator adds (``--allow-app SHA256``).

A refused FAB is never stored, installed or imported: the message gets an error reply
(``INVALID_FAB``, saying which hash was refused), one log line at the site says which app,
which hash and how to allow it, and the SuperNode goes on serving allowed runs. The check
wraps ``flwr.supernode.start_client_internal._pull_and_store_message`` (flwr 1.42.0), the
function that fetches a run's FAB before anything else uses it.

Run as ``python -m client.supernode [--allow-app SHA256 ...] <flower-supernode arguments>``
(``medunic client start`` does).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import logging
import sys
import tomllib
import zipfile
from functools import lru_cache
from logging import ERROR, INFO
from logging.handlers import TimedRotatingFileHandler
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import flwr

from medunic_core import __version__
from medunic_core.constants import APP_DIR
from medunic_core.errors import ConfigError

PINNED_FLWR = "1.42.0"


class RefusedApp(Exception):
    """A FAB whose content hash this site does not allow."""


@lru_cache(maxsize=1)
def installed_app_hash() -> str:
    """SHA-256 of the FAB that ``flwr run`` builds from the medunic app installed here."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(APP_DIR)).hexdigest()


def check_sha256(value: str) -> str:
    value = value.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ConfigError(f"'{value}' is not a SHA-256 (64 hex digits); `medunic client app-hash` prints one")
    return value


def allowed_apps(extra: Sequence[str] = ()) -> dict[str, str]:
    """Allowed FAB hash -> why it is allowed."""
    allowed = {installed_app_hash(): f"the medunic {__version__} installed at {APP_DIR}"}
    for value in extra:
        allowed.setdefault(check_sha256(value), "allowed by the site operator (--allow-app)")
    return allowed


def describe_fab(content: bytes) -> str:
    """``publisher/name version`` from the FAB's pyproject.toml, read as data (nothing is imported)."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            meta = tomllib.loads(fab.read("pyproject.toml").decode())
        project, app = meta.get("project", {}), meta.get("tool", {}).get("flwr", {}).get("app", {})
        return f"'{app.get('publisher', '?')}/{project.get('name', '?')}' version {project.get('version', '?')}"
    except Exception:  # noqa: BLE001 -- a broken FAB is described, not trusted
        return "an unreadable FAB"


class AppGuard:
    """Decides, from a FAB's bytes, whether this site runs it."""

    def __init__(self, allowed: Mapping[str, str]) -> None:
        self.allowed = dict(allowed)

    def check(self, content: bytes) -> str:
        """The FAB's SHA-256 if allowed; raises :class:`RefusedApp` with the site's log line."""
        digest = hashlib.sha256(content).hexdigest()
        if digest not in self.allowed:
            raise RefusedApp(
                f"refused to run app {describe_fab(content)} with FAB sha256 {digest}: this site runs only "
                f"{', '.join(f'{h[:12]}... ({why})' for h, why in self.allowed.items())}. To allow it, restart "
                f"the site daemon with --allow-app {digest}"
            )
        return digest

    def wrap(self, pull_and_store: Callable[..., Optional[int]]) -> Callable[..., Optional[int]]:
        """``_pull_and_store_message`` with the check between fetching a new run's FAB and
        storing it; a refused run's message gets an error reply instead."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode
        from flwr.supercore import log
        from flwr.supernode.start_client_internal import _insert_message

        guard = self

        def guarded(**kwargs: Any) -> Optional[int]:
            received: dict[str, Message] = {}
            receive, get_fab = kwargs["receive"], kwargs["get_fab"]

            def receive_and_keep():
                got = receive()
                if got is not None:
                    received["message"] = got[0]
                return got

            def checked_get_fab(fab_hash: str, run_id: int):
                fab = get_fab(fab_hash, run_id)
                digest = guard.check(fab.content)
                log(INFO, "run %s: app %s, FAB sha256 %s, allowed", run_id, describe_fab(fab.content), digest)
                return fab

            try:
                return pull_and_store(**{**kwargs, "receive": receive_and_keep, "get_fab": checked_get_fab})
            except RefusedApp as refused:
                message = received["message"]
                log(ERROR, "run %s: %s", message.metadata.run_id, refused)
                state, store = kwargs["state"], kwargs["object_store"]
                reply = Message(Error(ErrorCode.INVALID_FAB, f"site refused the app: {refused}"), reply_to=message)
                state.record_message_processing_start(message.metadata.message_id)
                state.record_message_processing_end(message.metadata.message_id)
                _insert_message(reply, state, store)
                return message.metadata.run_id

        return guarded


def install(guard: AppGuard) -> None:
    """Put ``guard`` in front of the SuperNode's FAB handling (flwr 1.42.0)."""
    loop = importlib.import_module("flwr.supernode.start_client_internal")  # the module, not the function
    loop._pull_and_store_message = guard.wrap(loop._pull_and_store_message)


def main(argv: Optional[Sequence[str]] = None) -> None:
    if flwr.__version__ != PINNED_FLWR:
        raise SystemExit(f"client.supernode wraps flwr {PINNED_FLWR}; this environment has {flwr.__version__}")
    parser = argparse.ArgumentParser(prog="python -m client.supernode", add_help=False)
    parser.add_argument("--allow-app", action="append", default=[], help="an extra allowed FAB sha256 (repeat)")
    parser.add_argument("--log-file", default=None, help="also log to this file, rotated daily (14 kept)")
    ours, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if ours.log_file:
        Path(ours.log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = TimedRotatingFileHandler(ours.log_file, when="midnight", backupCount=14, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("flwr").addHandler(handler)
    try:
        allowed = allowed_apps(ours.allow_app)
    except ConfigError as exc:
        raise SystemExit(f"client.supernode: {exc}") from None
    from flwr.supercore import log

    for digest, why in allowed.items():
        log(INFO, "this site runs apps with FAB sha256 %s (%s)", digest, why)
    install(AppGuard(allowed))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()

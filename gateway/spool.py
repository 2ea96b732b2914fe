"""The gateway's spool directory: open, fill and publish the spool files the router asks for.

The file format is ``dataplane.spool`` (producers read it to replay). This module holds the
gateway side: preparing ``gateway.spool_dir`` (a private directory: 0700, this user's, not a
link), and the open writers of spooled scans, used only by the forwarding thread. An I/O error is
reported to the caller (which counts the loss); it never stops the gateway.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.privatefs import PrivatePathError, private_dir
from dataplane.spool import SpoolManifest, SpoolWriter
from gateway.router import ScanKey

log = logging.getLogger("dsn.gateway.spool")


def prepare_spool_dir(directory: Path | None) -> Path | None:
    """The usable spool directory, or None (logged) when spooling must be refused."""
    if directory is None:
        return None
    problem = _spool_dir_problem(directory)
    if problem is None:
        # Absolute: spool paths are reported to producers and the control plane.
        return directory.resolve()
    log.warning("spool_dir unusable; scans without consumers will be refused",
                extra={"fields": {"spool_dir": str(directory), "reason": problem}})
    return None


def _spool_dir_problem(directory: Path) -> str | None:
    # Spools hold a session's detector data: the directory is this user's alone.
    try:
        private_dir(directory)
    except PrivatePathError as exc:
        return str(exc)
    if not os.access(directory, os.W_OK | os.X_OK):
        return "not writable"
    return None


class Spools:
    """The open spool writers of one gateway, by scan, and the files published per session."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._open: dict[ScanKey, SpoolWriter] = {}
        self.files: dict[str, int] = {}

    def open(self, key: ScanKey, begin: bytes) -> bool:
        try:
            self._open[key] = SpoolWriter(self.directory, key.session, key.scan, begin)
        except (OSError, PrivatePathError) as exc:
            return self._failed("open", key, exc)
        return True

    def write(self, key: ScanKey, header: bytes | memoryview, payload: memoryview) -> bool:
        writer = self._open.get(key)
        if writer is None:
            return False
        try:
            writer.write(header, payload)
        except OSError as exc:
            self._discard(key)
            return self._failed("write", key, exc)
        return True

    def finish(self, key: ScanKey, manifest: SpoolManifest) -> Path | None:
        writer = self._open.pop(key, None)
        if writer is None:
            return None
        try:
            path = writer.finish(manifest)
        except OSError as exc:
            self._failed("finish", key, exc)
            return None
        self.files[key.session] = self.files.get(key.session, 0) + 1
        log.info("spooled", extra={"fields": {"session": key.session, "scan": key.scan,
                                              "path": str(path), "records": writer.records}})
        return path

    def abandon_all(self) -> None:
        """Close every open spool without a trailer (the gateway stops mid-scan)."""
        for key in list(self._open):
            partial = self._discard(key)
            log.warning("spool left incomplete", extra={"fields": {
                "session": key.session, "scan": key.scan, "path": str(partial)}})

    def _discard(self, key: ScanKey) -> Path:
        writer = self._open.pop(key)
        try:
            return writer.abandon()
        except OSError:
            return writer.partial

    def _failed(self, action: str, key: ScanKey, exc: OSError | PrivatePathError) -> bool:
        error = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.error("spool failed", extra={"fields": {
            "action": action, "session": key.session, "scan": key.scan, "error": error}})
        return False

"""CURVE for the transport: which endpoints need it (anything not on loopback, or
``transport.curve_force``) and the key files each end loads; errors name the config field.
Not covered: binding an actor id to a key (any allowed key may claim any actor id)."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import zmq
import zmq.auth

from common.config import TransportConfig
from common.transport.base import TransportSecurityError

log = logging.getLogger(__name__)


def is_loopback(endpoint: str) -> bool:
    """True if ``endpoint`` cannot be reached from another machine."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp" or not rest:
        return False
    host = rest.rsplit(";", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface name, a host name
        return False


def curve_enabled(cfg: TransportConfig) -> bool:
    """Both sides use CURVE iff forced or any endpoint is not loopback."""
    return cfg.curve_force or not (is_loopback(cfg.trajectory_addr) and is_loopback(cfg.control_addr))


def _load_keypair(path: str | None, what: str, need_secret: bool) -> tuple[bytes, bytes | None]:
    if not path:
        raise TransportSecurityError(f"{what} is not set")
    p = Path(path)
    if not p.is_file():
        raise TransportSecurityError(f"{what}: no such file {p}")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (ValueError, OSError) as e:
        raise TransportSecurityError(f"{what}: cannot read a CURVE key from {p}: {e}") from None
    if need_secret and not secret:
        raise TransportSecurityError(f"{what}: {p} holds no secret key")
    return public, secret


def _server_curve_setup(cfg: TransportConfig) -> tuple[bytes, bytes, Path]:
    exposed = [a for a in (cfg.trajectory_addr, cfg.control_addr) if not is_loopback(a)]
    why = (f"endpoint(s) {', '.join(exposed)} are not loopback" if exposed else "transport.curve_force is on")
    if not cfg.curve_secret_key or not cfg.curve_public_keys_dir:
        raise TransportSecurityError(
            f"refusing to bind without CURVE: {why}; set transport.curve_secret_key (the learner's "
            "secret-key file) and transport.curve_public_keys_dir (allowed actors' public keys), "
            "e.g. written by zmq.auth.create_certificates, or bind 127.0.0.1")
    public, secret = _load_keypair(cfg.curve_secret_key, "transport.curve_secret_key", True)
    keys_dir = Path(cfg.curve_public_keys_dir)
    if not keys_dir.is_dir():
        raise TransportSecurityError(f"transport.curve_public_keys_dir: no such folder {keys_dir}")
    if not any(keys_dir.glob("*.key")):
        log.warning("transport: %s holds no public keys; no actor can connect", keys_dir)
    return public, secret, keys_dir


def _client_curve_setup(cfg: TransportConfig) -> tuple[bytes, bytes, bytes]:
    public, secret = _load_keypair(cfg.curve_client_secret_key, "transport.curve_client_secret_key", True)
    server_file = cfg.curve_server_public_key or cfg.curve_secret_key
    server_public, _ = _load_keypair(server_file, "transport.curve_server_public_key", False)
    return public, secret, server_public

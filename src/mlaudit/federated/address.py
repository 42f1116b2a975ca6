"""Where a malicious audit server may listen: loopback unless the caller says otherwise (no flwr needed,
so configs are checked before anything is imported or started)."""

from __future__ import annotations

import ipaddress

from ..errors import ConfigError


def check_address(host: str, *, allow_remote: bool, field: str = "host") -> None:
    """A Flower server binds to loopback unless ``allow_remote``: anything else is a ConfigError naming
    ``field``."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not allow_remote:
        raise ConfigError(f"{field} = {host!r} is not a loopback address; allowed: 127.0.0.1, ::1 or localhost, "
                          "or set allow_remote (true) to expose the malicious server on a network")

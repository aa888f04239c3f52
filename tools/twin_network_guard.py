"""Refuses and records every network connection but loopback, in every Python process of the
GPU twin (tools/gpu_twin.py installs this module with a .pth file into the twin's
site-packages, so that it holds whatever PYTHONPATH a process gets). The GPU machine reaches no
network: a check that tries one passes here only by luck and fails there.

install(log_path): from then on, socket.connect / getaddrinfo to anything but loopback (or a
Unix socket) raises OSError and appends a line to log_path.
"""
import ipaddress
import os
import sys

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def _is_loopback_host(host):
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host)
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # a name other than localhost needs a resolver: the network
    return address.is_loopback or address.is_unspecified


def _blocked(event, args):
    """The host a network event reaches, or None when it stays on this machine."""
    if event == "socket.connect":
        address = args[1]
        if not isinstance(address, tuple):  # AF_UNIX path
            return None
        return None if _is_loopback_host(address[0]) else address[0]
    if event == "socket.getaddrinfo":
        return None if _is_loopback_host(args[0]) else args[0]
    return None


def install(log_path):
    def hook(event, args):
        if event not in ("socket.connect", "socket.getaddrinfo"):
            return
        host = _blocked(event, args)
        if host is None:
            return
        with open(log_path, "a") as f:
            f.write(f"{event} {host!r} pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n")
        raise OSError(f"network refused in the GPU twin ({event} to {host!r}): the GPU machine has none")

    sys.addaudithook(hook)

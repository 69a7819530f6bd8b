"""The network a job's rendezvous and collectives use, checked on every node before torchrun starts
(hpcft.launch, so `hpcft doctor` too): the head node's name resolves here, the interface that reaches
it is exported for gloo and NCCL (unless the user chose one), and the rendezvous port is one the head
node can bind, published in the run directory so that every node uses the same one.

    head = resolve_head("node1")                  # -> "10.1.0.5", or NetworkError naming node and host
    iface = interface_for(head)                    # -> "eth0" (the interface holding the address that routes there)
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
import time
from pathlib import Path

SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
PORT_WAIT_S = 180  # how long a node waits for the head node's published port
SIOCGIFADDR, SIOCGIFNETMASK = 0x8915, 0x891B


class NetworkError(RuntimeError):
    """A node cannot take part: the message names the node, the host and the fix."""


def resolve_head(host: str) -> str:
    """The head node's IPv4 address as this node resolves it (what the rendezvous connects to)."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NetworkError(f"node {socket.gethostname()} cannot resolve the head node {host!r} ({exc.strerror}); "
                           "every node must resolve every other's name: fix DNS or /etc/hosts, or ask the site "
                           "why Slurm's node names do not resolve on the compute nodes") from None
    return infos[0][4][0]


def local_addresses() -> dict[str, str]:
    """interface -> its IPv4 address/prefix (10.1.0.5/16), for every interface that has one."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])
                mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFNETMASK, req)[20:24])
            except OSError:
                continue
            out[name] = f"{addr}/{bin(int.from_bytes(socket.inet_aton(mask), 'big')).count('1')}"
    return out


def source_address(dest: str) -> str:
    """The local address the kernel would send from to reach dest (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((dest, 9))
        return s.getsockname()[0]


def interface_for(dest: str, addresses: dict[str, str] | None = None) -> str | None:
    """The interface that reaches dest: the one holding the source address the kernel picks for it (so
    on the head node itself its own address's interface, not lo), else the one whose network holds it."""
    import ipaddress

    addresses = local_addresses() if addresses is None else addresses
    try:
        src = source_address(dest)
    except OSError:
        return None
    nets = {name: ipaddress.ip_interface(a) for name, a in addresses.items()}
    exact = [n for n, i in nets.items() if str(i.ip) == src]
    if exact:
        return exact[0]
    holding = sorted((n for n, i in nets.items() if ipaddress.ip_address(src) in i.network),
                     key=lambda n: -nets[n].network.prefixlen)
    return holding[0] if holding else None


def port_free(port: int) -> bool:
    """Nothing listens on (or holds) this port here, over IPv4 or IPv6."""
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((addr, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            if family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue
            raise
    return True


def pick_port(preferred: int, tries: int = 200, *, avoid: range | None = None) -> int:
    """preferred when free, else one the OS hands out that lies outside `avoid` (the band job ids map
    into). Not preferred+1: that is the next job id's own port, and a job that shares this node and
    falls back there joins the other job's rendezvous store (one job died when the other closed it)."""
    if port_free(preferred):
        return preferred
    for _ in range(tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
        if (avoid is None or port not in avoid) and port_free(port):
            return port
    raise NetworkError(f"no free port from {preferred} on {socket.gethostname()} after {tries} tries")


def publish_port(path: Path, host: str, port: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"host": host, "port": port, "by": socket.gethostname()}))
    os.replace(tmp, path)


def await_port(path: Path, timeout_s: float = PORT_WAIT_S) -> int:
    """The port the head node published (its launcher writes it before starting torchrun)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            return int(json.loads(path.read_text())["port"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    raise NetworkError(f"node {socket.gethostname()} waited {timeout_s:.0f} s for the head node to publish its "
                       f"rendezvous port in {path}; is the run directory on a filesystem every node shares?")


def infiniband_devices(sysfs: Path = Path("/sys/class/infiniband")) -> list[str]:
    try:
        return sorted(p.name for p in sysfs.iterdir())
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# NCCL's own account of the transport it chose (NCCL_DEBUG=INFO lines in the rank logs).


def nccl_transport(lines) -> dict:
    """From NCCL INFO lines: the IB devices NCCL saw, whether it said there were none, and which network
    its channels use ("IB", "Socket", or None when the logs do not say)."""
    ib, none_found, used = [], False, set()
    for line in lines:
        if "NCCL INFO" not in line:
            continue
        text = line.split("NCCL INFO", 1)[1].strip()
        if text.startswith("NET/IB :") or text.startswith("NET/IB:"):
            if "No device found" in text:
                none_found = True
            else:
                ib += [w.split(":")[0].split("]", 1)[-1] for w in text.split() if w.startswith("[") and "]" in w]
        elif text.startswith("Using network "):
            used.add(text.split()[2].rstrip(".").split("_")[0])
        elif " via NET/" in text:
            used.add(text.split(" via NET/", 1)[1].split("/")[0])
    network = "IB" if "IB" in used else ("Socket" if "Socket" in used else None)
    return {"ib_devices": sorted(set(ib)), "ib_none_found": none_found, "network": network}


def socket_over_ib_warning(nccl: dict, node_ib: dict[str, list[str]]) -> str | None:
    """A warning when NCCL sent traffic over sockets on nodes that have InfiniBand devices (from the
    launchers' report), or whose IB devices NCCL itself listed."""
    if nccl["network"] != "Socket":
        return None
    with_ib = {n: d for n, d in node_ib.items() if d}
    if not with_ib and not nccl["ib_devices"]:
        return None
    devices = sorted({x for d in with_ib.values() for x in d} | set(nccl["ib_devices"]))
    where = f" on {', '.join(sorted(with_ib))}" if with_ib else ""
    return (f"NCCL used TCP sockets although InfiniBand devices exist{where} ({', '.join(devices)}): collectives "
            "run far slower. Check NCCL_IB_DISABLE, NCCL_IB_HCA, that the container sees /dev/infiniband "
            "(--nv is not enough), and that NCCL's IB plugin loads (NCCL_DEBUG=INFO, NCCL_DEBUG_SUBSYS=INIT,NET)")

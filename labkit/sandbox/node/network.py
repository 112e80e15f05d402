"""The pod network: an address for every pod, on one routed network that the node agent owns.

The agent starts a network namespace of its own, the **pod network**, held by a
sleeping process as a pod's namespaces are held by its pause process. Each pod's
network namespace is joined to it by a veth pair, routed as Calico routes it:

* the pod's end is ``eth0``, with the pod's address as a /32 and a default route
  via ``169.254.1.1``, on the link;
* the pod network's end (``lk<pod uid>``) has a /32 route to the pod, and answers
  for ``169.254.1.1``, which the pod network has on its loopback (Linux answers
  ARP on any interface for any of its addresses).

So every packet between pods, to a Service or from the agent crosses the pod
network's own IP stack, where Services are DNAT rules (``services.py``) and
faults are injected (``faults.py``). The agent itself stays in the machine's
network, where it reaches the API server; it enters the pod network to configure
it, and holds sockets there for the cluster's DNS, the ``kubernetes`` Service
and the forwards that let a notebook reach a Service.

It works the same as root and as an ordinary user: the agent is root in a user
namespace of its own there, and owns every namespace it makes. Pod addresses
come from each node's ``spec.podCIDR``, which the controller manager's node IPAM
assigns; each node also has the first address of its range in the pod network
(its "node IP" there: NodePorts answer on it).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from labkit.sandbox import procs
from labkit.sandbox.node.namespaces import in_network
from labkit.sandbox.node.netlink import Netlink

GATEWAY = "169.254.1.1"
# The pod network routes; it takes packets whose source is one of its own addresses, which is what the replies
# to the agent's own connections to a ClusterIP are once un-DNATed (the Service range is local here); its local
# routes are looked up after the faults' policy rules (priority 1000), so that a pod's packets to the agent's own
# addresses can be delayed too; and no early demultiplexing, which would deliver such packets to the agent's
# sockets before any rule is consulted.
SETUP = ("ip link set lo up; echo 1 > /proc/sys/net/ipv4/ip_forward; "
         "echo 1 > /proc/sys/net/ipv4/conf/all/accept_local; echo 0 > /proc/sys/net/ipv4/ip_early_demux; "
         "ip rule add pref 2000 lookup local && ip rule del pref 0 lookup local; exec sleep infinity")


@dataclass
class Networking:
    """The agent's pod network and what serves on it: the service proxy, the forwards, the DNS address."""

    network: PodNetwork
    proxy: Any  # services.ServiceProxy
    forwards: Any  # forward.Forwards
    faults: Any  # faults.Faults
    dns_ip: str
    mode: str  # "root", or "rootless" (the agent is root in a user namespace of its own)


def tool(name: str) -> str | None:
    """A system tool's path, looked for in the sbin folders too (an ordinary user's PATH often lacks them)."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin")


class NetworkError(Exception):
    """The pod network cannot do what was asked (no tools, no namespaces, no range)."""


def veth_name(uid: str) -> str:
    """``lk`` and the pod's uid in hex: never ``lkt``, the prefix of the faults' TUN devices."""
    return "lk" + uid.replace("-", "")[:12]


class PodNetwork:
    """The agent's pod network: the namespace, addresses per node, and the veth of each pod."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.holder: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.used: dict[str, set[str]] = {}  # node CIDR -> addresses in use
        self.owners: dict[str, str] = {}  # pod uid -> address
        self.gateways: set[str] = set()  # node IPs already on the pod network's loopback
        self.problem = ""

    # -- the namespace ----------------------------------------------------------------------

    def start(self) -> bool:
        """Make the pod network; False (and ``problem`` says why) where this machine cannot."""
        missing = [name for name in ("ip", "nft", "unshare", "setpriv", "sh", "sleep") if not tool(name)]
        if missing:
            self.problem = (f"{', '.join(missing)} not found: install the Debian packages iproute2, nftables and "
                            "util-linux (`make setup` does, as root)")  # fmt: skip
            return False
        self.holder = subprocess.Popen([tool("setpriv"), "--pdeathsig", "KILL", "--", tool("unshare"), "--net", "--", "sh", "-c",
                                        f"PATH=$PATH:{os.path.dirname(tool('ip'))}; {SETUP}"],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       start_new_session=True)  # fmt: skip
        own = procs.namespace(os.getpid(), "net")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.holder.poll() is None:
            if procs.namespace(self.holder.pid, "net") not in (None, own) and _sleeping(self.holder.pid):
                return True
            time.sleep(0.01)
        error = self.holder.stderr.read().decode(errors="replace").strip() if self.holder.poll() is not None else ""
        self.problem = f"the pod network could not be made ({error or 'its holder did not start'})"
        self.stop()
        return False

    @property
    def pid(self) -> int:
        assert self.holder is not None
        return self.holder.pid

    def stop(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait()

    def run(self, commands: list[str], pid: int | None = None) -> None:
        """``ip -batch`` in the network namespace of ``pid`` (default: the pod network's)."""
        _feed(pid or self.pid, ["ip", "-batch", "-"], "\n".join(commands) + "\n")

    def nft(self, text: str) -> None:
        """``nft -f -`` in the pod network."""
        _feed(self.pid, ["nft", "-f", "-"], text)

    def add_services(self, service_cidr: str, *addresses: str) -> None:
        """The Service range, local to the pod network (so that a ClusterIP nothing answers for is refused by the
        service rules, not unroutable), and the addresses the agent serves on itself there (the ``kubernetes``
        and ``kube-dns`` ClusterIPs)."""
        self.run([f"route add local {service_cidr} dev lo", *(f"addr add {address}/32 dev lo" for address in addresses)])

    # -- addresses --------------------------------------------------------------------------

    def node_ip(self, cidr: str) -> str:
        """A node's own address on the pod network: the first of its range."""
        return str(next(ipaddress.ip_network(cidr, strict=False).hosts()))

    def _allocate(self, cidr: str, uid: str) -> str:
        with self.lock:
            if uid in self.owners:
                return self.owners[uid]
            used = self.used.setdefault(cidr, set())
            hosts = ipaddress.ip_network(cidr, strict=False).hosts()
            next(hosts)  # the node's own
            for address in map(str, hosts):
                if address not in used:
                    used.add(address)
                    self.owners[uid] = address
                    return address
        raise NetworkError(f"no free address left in {cidr}")

    def veth_of(self, address: str) -> str | None:
        """The pod network's end of the veth of the pod with ``address``."""
        with self.lock:
            uid = next((u for u, a in self.owners.items() if a == address), None)
        return veth_name(uid) if uid else None

    def release(self, uid: str) -> None:
        with self.lock:
            address = self.owners.pop(uid, None)
            for used in self.used.values():
                used.discard(address)

    # -- pods -------------------------------------------------------------------------------

    def attach(self, uid: str, cidr: str, pause_pid: int) -> str:
        """Give the pod whose namespaces ``pause_pid`` holds an address from ``cidr``, joined to the pod
        network; its address. Done again for a pod whose namespaces were made again."""
        address = self._allocate(cidr, uid)
        veth = veth_name(uid)
        gateway = self.node_ip(cidr)
        try:
            with Netlink(self.pid) as outer:
                if gateway not in self.gateways:  # the node's address, and (once) the pods' gateway, on lo
                    outer.add_address("lo", gateway)
                    if not self.gateways:
                        outer.add_address("lo", GATEWAY)
                    self.gateways.add(gateway)
                outer.add_veth(veth, "eth0", pause_pid)
                outer.add_route(address, veth)
            with Netlink(pause_pid) as inner:
                inner.up("eth0")
                inner.add_address("eth0", address)
                inner.add_route(None, "eth0", gateway=GATEWAY)
        except OSError as exc:
            self.release(uid)
            raise NetworkError(f"the pod's network could not be set up: {exc}") from exc
        return address


def _feed(pid: int, argv: list[str], text: str) -> None:
    """Run tool ``argv`` with ``text`` on its input in the network namespace of ``pid`` (the child starts in
    the caller's network); NetworkError with what it said if it fails."""
    done = in_network(pid, subprocess.run, [tool(argv[0]), *argv[1:]], input=text, capture_output=True, text=True,
                      timeout=30)  # fmt: skip
    if done.returncode != 0:
        raise NetworkError(done.stderr.strip()[-2000:] or f"{argv[0]} exited with {done.returncode}")


def _sleeping(pid: int) -> bool:
    """Whether the holder has finished its set-up and sleeps (its command is ``sleep`` now)."""
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip() == "sleep"
    except OSError:
        return False

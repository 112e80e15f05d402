"""Network faults on the pod network, each reversible: latency with jitter, loss, bandwidth, partitions.

Faults act where all pod traffic passes, in the pod network, after Services have
chosen an endpoint; so a fault on a pod affects its traffic to pods and Services
alike. Two mechanisms:

* **partitions** drop packets between two sets of pod addresses, one way or both,
  with nftables (the ``labkit-faults`` table);
* **delay, jitter, loss and rate** apply to a pod's outgoing packets (optionally
  only those to some addresses), as tc's netem does on a pod's interface: policy
  routing sends them through a TUN device of the fault's own, which the agent
  reads; it holds each packet for the delay (± a uniformly drawn jitter, never
  reordering), drops it with the loss probability, paces it to the rate, and
  writes it back, whence it goes its way untracked (its NAT was already done).
  netem itself is not used because not every kernel has it (this machine's has
  not).

``Faults`` keeps them by id; removing one restores the traffic at once. They go
with the pod network when the agent stops.
"""

from __future__ import annotations

import fcntl
import heapq
import itertools
import os
import random
import secrets
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from labkit.sandbox.node.handoff import Handoff
from labkit.sandbox.node.namespaces import in_network
from labkit.sandbox.node.network import NetworkError, PodNetwork

# A fault's TUN device: lkt<id>. Not a hex digit after "lk", so no pod's veth (lk<uid hex>) ever matches the
# untracked-re-injection rule (iifname "lkt*"): a veth that did would lose its pod's Service and NAT replies.
TUN_PREFIX = "lkt"
TABLE = "labkit-faults"
FIRST_ROUTE_TABLE = 7000  # a fault's routing table: one each
RULE_PRIORITY = 1000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
KINDS = ("delay", "loss", "bandwidth", "partition")


@dataclass
class Fault:
    id: str
    kind: str
    sources: list[str]  # pod addresses whose outgoing traffic it affects (a partition's side A)
    to: list[str] = field(default_factory=list)  # only traffic to these (a partition's side B); [] = all
    delay: float = 0.0  # seconds
    jitter: float = 0.0
    loss: float = 0.0  # probability
    rate: float = 0.0  # bits per second; 0 = unlimited
    both: bool = True  # partitions: B to A too
    veths: dict[str, str] = field(default_factory=dict)  # source address -> its veth
    # the emulator's state: the fault's TUN device and routing table, when the pipe is next free, the last release
    tun: int | None = None
    table: int = 0
    stopped: bool = False  # removed: nothing more is read from or written to its device
    next_free: float = 0.0
    last_release: float = 0.0

    @property
    def device(self) -> str:
        return TUN_PREFIX + self.id

    def rules(self, verb: str) -> list[str]:
        """``ip rule`` commands that send (``add``) or stop sending (``del``) its pods' packets to its device."""
        return [f"rule {verb} iif {veth}" + (f" to {to}/32" if to else "") + f" lookup {self.table} priority {RULE_PRIORITY}"
                for veth in self.veths.values() for to in (self.to or [""])]  # fmt: skip

    def describe(self) -> dict:
        return {"id": self.id, "kind": self.kind, "sources": self.sources, "to": self.to,
                "delay_ms": round(self.delay * 1000, 3), "jitter_ms": round(self.jitter * 1000, 3),
                "loss_percent": round(self.loss * 100, 3), "rate_bps": self.rate, "both": self.both}  # fmt: skip


def parse(spec: dict, veth_of: Callable[[str], str | None]) -> Fault:
    """A fault from its JSON form (the kubelet API's); ValueError says what is wrong with it."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    sources = [str(s) for s in spec.get("sources") or []]
    to = [str(s) for s in spec.get("to") or []]
    if not sources:
        raise ValueError("a fault needs the pods it applies to (sources): none were given or none exist")
    for address in [*sources, *to]:
        try:
            socket.inet_aton(address)
        except OSError:
            raise ValueError(f"{address!r} is not an IPv4 address") from None
    fault = Fault(secrets.token_hex(4), kind, sources, to,
                  delay=float(spec.get("delay_ms", 0)) / 1000, jitter=float(spec.get("jitter_ms", 0)) / 1000,
                  loss=float(spec.get("loss_percent", 0)) / 100, rate=float(spec.get("rate_bps", 0)),
                  both=bool(spec.get("both", True)))  # fmt: skip
    if kind == "partition":
        if not to:
            raise ValueError("a partition needs the other side (to)")
        return fault
    if fault.delay < 0 or fault.jitter < 0 or fault.jitter > fault.delay or fault.delay > 60:
        raise ValueError("delay must be 0 to 60 s, and jitter no more than the delay")
    if not 0 <= fault.loss <= 1:
        raise ValueError("loss must be 0 to 100 percent")
    if fault.rate < 0:
        raise ValueError("rate must be positive")
    for address in sources:
        veth = veth_of(address)
        if veth is None:
            raise ValueError(f"no pod on this sandbox's network has the address {address}")
        fault.veths[address] = veth
    return fault


class Faults:
    """The faults in force on one pod network."""

    def __init__(self, network: PodNetwork, log: Callable[[str], None]) -> None:
        self.network = network
        self.log = log
        self.lock = threading.Lock()
        self.faults: dict[str, Fault] = {}
        self.queue: list[tuple[float, int, Fault, bytes]] = []  # (release time, order, fault, packet)
        self.wake = threading.Condition()
        self.counter = itertools.count()
        self.tables = itertools.count(FIRST_ROUTE_TABLE)
        # One thread reads every fault's device and is the only one to close it: a device's file number is
        # reused as soon as it is closed (by a socket, say), so no other thread may still hold it then.
        self.selector = selectors.DefaultSelector()
        self.handed: Handoff[Fault] = Handoff(self.selector)  # faults added, or removed, for the reading thread
        threading.Thread(target=self._read, name="faults-read", daemon=True).start()
        threading.Thread(target=self._write, name="faults-write", daemon=True).start()

    # -- adding and removing ----------------------------------------------------------------

    def add(self, spec: dict) -> Fault:
        fault = parse(spec, self.network.veth_of)
        with self.lock:
            if fault.kind != "partition":
                self._emulate(fault)
            self.faults[fault.id] = fault
            self._write_rules()
        self.log(f"fault {fault.id} on: {fault.describe()}")
        return fault

    def remove(self, fault_id: str) -> bool:
        with self.lock:
            fault = self.faults.pop(fault_id, None)
            if fault is None:
                return False
            if fault.kind != "partition":
                for rule in fault.rules("del"):
                    try:
                        self.network.run([rule])
                    except NetworkError:
                        pass  # the pod, with its veth and its rules, may be gone already
                with self.wake:  # packets held for it go; the reading thread closes its device
                    fault.stopped = True
                    self.queue = [entry for entry in self.queue if entry[2] is not fault]
                    heapq.heapify(self.queue)
                self.handed.hand(fault)
            self._write_rules()
        self.log(f"fault {fault_id} off")
        return True

    def list(self) -> list[dict]:
        with self.lock:
            return [f.describe() for f in self.faults.values()]

    def _write_rules(self) -> None:
        """The ``labkit-faults`` table: partitions, and untracked re-injection of the emulator's packets."""
        drops = []
        for fault in self.faults.values():
            if fault.kind == "partition":
                a, b = ", ".join(fault.sources), ", ".join(fault.to)
                drops.append(f"ip saddr {{ {a} }} ip daddr {{ {b} }} drop")
                if fault.both:
                    drops.append(f"ip saddr {{ {b} }} ip daddr {{ {a} }} drop")
        body = "\n".join(f"    {rule}" for rule in drops)
        self.network.nft(
            f"table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n"
            f"  chain raw {{\n    type filter hook prerouting priority -300; policy accept;\n"
            f'    iifname "{TUN_PREFIX}*" notrack\n  }}\n'
            f"  chain partitions {{\n    type filter hook forward priority -10; policy accept;\n{body}\n  }}\n}}\n"
        )

    # -- the emulator -----------------------------------------------------------------------

    def _emulate(self, fault: Fault) -> None:
        """Give ``fault`` its TUN device and routing table, send its pods' packets there, and read them."""
        fd = in_network(self.network.pid, _open_tun, fault.device)  # the device is made in the pod network
        fault.tun, fault.table = fd, next(self.tables)
        try:
            self.network.run([f"link set {fault.device} up", f"route replace default dev {fault.device} table {fault.table}",
                              *fault.rules("add")])  # fmt: skip
        except NetworkError:
            os.close(fd)
            raise
        self.handed.hand(fault)

    def _read(self) -> None:
        """Each packet the faults' pods send: dropped, or queued for when its delay, jitter and rate say."""
        while True:
            for key, _ in self.selector.select():
                if key.fd == self.handed.read:
                    self._take_handed()
                    continue
                fault = key.data
                try:
                    packet = os.read(fault.tun, 65536)
                except OSError:  # nothing after all (non-blocking), or the device is gone with the pod network
                    continue
                if len(packet) < 20 or packet[0] >> 4 != 4:
                    continue  # IPv6 (the kernel's own, on the device): the pod network has none
                if fault.loss and random.random() < fault.loss:
                    continue
                now = time.monotonic()
                release = now + fault.delay + (random.uniform(-fault.jitter, fault.jitter) if fault.jitter else 0.0)
                if fault.rate:
                    fault.next_free = max(fault.next_free, now) + len(packet) * 8 / fault.rate
                    release = max(release, fault.next_free)
                release = max(release, fault.last_release)  # never reorder
                fault.last_release = release
                with self.wake:
                    if not fault.stopped:
                        heapq.heappush(self.queue, (release, next(self.counter), fault, checksummed(packet)))
                        self.wake.notify()

    def _take_handed(self) -> None:
        """Start reading the devices of faults just added; close those of faults just removed."""
        for fault in self.handed.take():  # a fault may be here twice (added and at once removed)
            if fault.tun is None:
                continue  # closed already
            registered = fault.tun in self.selector.get_map()
            if fault.stopped:  # removed: the writer no longer touches its device (it checks under the lock)
                if registered:
                    self.selector.unregister(fault.tun)
                os.close(fault.tun)
                fault.tun = None
            elif not registered:
                self.selector.register(fault.tun, selectors.EVENT_READ, fault)

    def _write(self) -> None:
        """Writes each held packet back when its time comes, into the pod network, to go its way."""
        while True:
            with self.wake:
                while not self.queue or self.queue[0][0] > time.monotonic():
                    self.wake.wait(max(0.0, self.queue[0][0] - time.monotonic()) if self.queue else None)
                _, _, fault, packet = heapq.heappop(self.queue)
                if fault.stopped:
                    continue
                try:
                    os.write(fault.tun, packet)  # under the lock: a removed fault's device is never written
                except OSError:
                    pass


def _open_tun(name: str) -> int:
    """A TUN device called ``name`` in this thread's network, without packet information; its file."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        os.set_blocking(fd, False)
    except OSError:
        os.close(fd)
        raise
    return fd


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksummed(packet: bytes) -> bytes:
    """An IPv4 packet with its TCP or UDP checksum computed. A pod's veth leaves it to be filled in later
    (checksum offload), which nobody does for a packet read from a TUN device: written back as it is, the
    packet would be dropped for a bad checksum."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return packet
    header = (packet[0] & 0x0F) * 4
    protocol = packet[9]
    offset = {6: 16, 17: 6}.get(protocol)  # the checksum's place in a TCP or UDP header
    total = struct.unpack("!H", packet[2:4])[0]
    if offset is None or len(packet) < total or total < header + offset + 2:
        return packet
    segment = bytearray(packet[header:total])
    segment[offset : offset + 2] = b"\0\0"
    pseudo = packet[12:20] + struct.pack("!BBH", 0, protocol, len(segment))
    checksum = 0xFFFF - _sum16(pseudo + bytes(segment))
    if protocol == 17 and checksum == 0:
        checksum = 0xFFFF
    segment[offset : offset + 2] = struct.pack("!H", checksum)
    return packet[:header] + bytes(segment) + packet[total:]

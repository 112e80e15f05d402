"""Just enough rtnetlink to join a pod to the pod network without starting a process.

``ip`` would do the same in a few milliseconds of CPU each time; in a burst of
pods starting at once those add up, so the agent speaks the kernel's routing
netlink itself: a veth pair whose peer goes into another process's network
namespace, links up, an address, a route. A netlink socket acts on the network
namespace it was made in (``namespaces.in_network`` makes it there).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from labkit.sandbox.node.namespaces import in_network

RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 18, 20, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_REPLACE = 0x1, 0x4, 0x200, 0x400, 0x100
NLMSG_ERROR = 2
IFLA_IFNAME, IFLA_LINKINFO, IFLA_NET_NS_PID = 3, 18, 19
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
IFF_UP = 0x1
RTNH_F_ONLINK = 0x4
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RTN_UNICAST = 254, 3, 0, 253, 1
NLA_F_NESTED = 0x8000


class NetlinkError(OSError):
    pass


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _name(kind: int, name: str) -> bytes:
    return _attr(kind, name.encode() + b"\0")


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)


class Netlink:
    """A routing netlink socket in the network namespace of process ``pid`` (this one's if None)."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self.sock = in_network(pid, socket.socket, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: int, flags: int, body: bytes, what: str) -> bytes:
        """Send one request; the kernel's answer (for a query), or its acknowledgement. NetlinkError says what
        failed."""
        self.seq += 1
        header = struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, 0)
        self.sock.send(header + body)
        answer = b""
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset < len(data):
                length, msg_type, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
                if seq == self.seq:
                    if msg_type == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, offset + 16)[0]
                        if code:
                            raise NetlinkError(code, f"{what}: {os.strerror(code)}")
                        return answer
                    answer = data[offset + 16 : offset + length]
                offset += (length + 3) & ~3

    def index(self, name: str) -> int:
        """The index of the device called ``name`` in this socket's network namespace."""
        answer = self.request(RTM_GETLINK, 0, _ifinfo() + _name(IFLA_IFNAME, name), f"find device {name}")
        if len(answer) < 16:
            raise NetlinkError(errno.ENODEV, f"no network device {name}")
        return struct.unpack_from("=i", answer, 4)[0]

    # -- what the pod network needs ---------------------------------------------------------

    def add_veth(self, name: str, peer: str, peer_pid: int) -> None:
        """A veth pair: ``name`` here, up, and ``peer`` in the network namespace of process ``peer_pid``, to be
        brought up there (it cannot be up before its other end exists). Each request takes the kernel's
        routing lock, which a burst of starting pods contends for: the fewer the better."""
        peer_info = _ifinfo() + _name(IFLA_IFNAME, peer) + _attr(IFLA_NET_NS_PID, struct.pack("=I", peer_pid))
        data = _attr(IFLA_INFO_DATA | NLA_F_NESTED, _attr(VETH_INFO_PEER | NLA_F_NESTED, peer_info))
        info = _attr(IFLA_LINKINFO | NLA_F_NESTED, _name(IFLA_INFO_KIND, "veth") + data)
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                     _ifinfo(flags=IFF_UP, change=IFF_UP) + _name(IFLA_IFNAME, name) + info, f"create veth {name}")  # fmt: skip

    def up(self, name: str) -> None:
        self.request(RTM_NEWLINK, 0, _ifinfo(self.index(name), IFF_UP, IFF_UP), f"bring up {name}")

    def add_address(self, name: str, address: str, prefix: int = 32) -> None:
        packed = socket.inet_aton(address)
        body = struct.pack("=BBBBI", socket.AF_INET, prefix, 0, RT_SCOPE_UNIVERSE, self.index(name))
        body += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
        try:
            self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, f"add {address}/{prefix} to {name}")
        except NetlinkError as exc:
            if exc.errno != errno.EEXIST:
                raise

    def add_route(self, destination: str | None, device: str, gateway: str | None = None) -> None:
        """A route to ``destination`` (/32; None: the default route) through ``device``: on-link, or via a
        ``gateway`` taken to be on the link too (``onlink``). Replaces one that is there."""
        scope = RT_SCOPE_LINK if gateway is None else RT_SCOPE_UNIVERSE
        body = struct.pack("=BBBBBBBBI", socket.AF_INET, 32 if destination else 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                           scope, RTN_UNICAST, RTNH_F_ONLINK if gateway else 0)  # fmt: skip
        if destination:
            body += _attr(RTA_DST, socket.inet_aton(destination))
        if gateway:
            body += _attr(RTA_GATEWAY, socket.inet_aton(gateway))
        body += _attr(RTA_OIF, struct.pack("=I", self.index(device)))
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body, f"route {destination or 'default'} via {device}")

"""Faults on the wire of the sandbox's pod network, injected through its node agent (``lab.delay``, ``lab.loss``,
``lab.bandwidth``, ``lab.partition``). Chaos Mesh's NetworkChaos (``lab.chaos``) does the same on any cluster
with Chaos Mesh; these are the sandbox's own, at a lower level."""

from __future__ import annotations

from typing import TYPE_CHECKING

from labkit.errors import LabkitError
from labkit.kube.quantity import rate_bits

if TYPE_CHECKING:
    from labkit.lab.context import LabContext
    from labkit.lab.reach import Reach


class NetworkFault:
    """A fault a lab injected into the sandbox's pod network; ``remove()`` ends it."""

    def __init__(self, faults: NetworkFaults, description: dict, what: str) -> None:
        self.faults = faults
        self.id = description["id"]
        self.description = description
        self.what = what

    def remove(self, quiet: bool = False) -> None:
        if self.faults.injected.pop(self.id, None) is None:
            return
        answer = self.faults.reach.agent("DELETE", f"/labkit/faults/{self.id}")
        if not quiet:
            self.faults.lab.say(f"fault {self.id} removed ({self.what})" if answer.ok else f"fault {self.id} was already gone")

    def __repr__(self) -> str:
        return f"<fault {self.id}: {self.what}>"


def _rate(rate: str | float) -> float:
    """Bits a second from ``"1mbit"``, ``"500kbit"``, ``"1mbps"`` (bytes) or a number."""
    if isinstance(rate, (int, float)):
        return float(rate)
    try:
        return rate_bits(rate)
    except ValueError as exc:
        raise LabkitError(str(exc), hint='Write it as tc does: "1mbit", "500kbit", "2gbit".') from None


class NetworkFaults:
    """The faults a lab injected, by id; removed when it closes."""

    def __init__(self, lab: LabContext, reach: Reach) -> None:
        self.lab = lab
        self.reach = reach
        self.injected: dict[str, NetworkFault] = {}

    def addresses(self, target: str) -> list[str]:
        addresses = [p["status"]["podIP"] for p in self.lab.pods_of(target)
                     if p.get("status", {}).get("podIP") and not p["metadata"].get("deletionTimestamp")]  # fmt: skip
        if not addresses:
            raise LabkitError(f"{target} has no running pod with an address to aim a fault at.",
                              hint=f"`lab.wait_ready({target!r})` first.")  # fmt: skip
        return addresses

    def inject(self, spec: dict, what: str) -> NetworkFault:
        answer = self.reach.agent("POST", "/labkit/faults", spec)
        if answer.status != 201:
            raise LabkitError(f"The fault could not be injected: {answer.text.strip()}")
        fault = NetworkFault(self, answer.json(), what)
        self.injected[fault.id] = fault
        self.lab.say(f"fault {fault.id}: {what}")
        return fault

    def delay(self, target: str, ms: float, *, jitter: float = 0, to: str | None = None) -> NetworkFault:
        """Delay the packets ``target``'s pods send (to ``to``'s pods only, if given) by ``ms`` ± ``jitter`` ms."""
        where = f" to {to}" if to else ""
        return self.inject({"kind": "delay", "sources": self.addresses(target), "delay_ms": ms, "jitter_ms": jitter,
                            "to": self.addresses(to) if to else []},
                           f"{target}'s packets{where} delayed {ms:g} ms" + (f" ± {jitter:g}" if jitter else ""))  # fmt: skip

    def loss(self, target: str, percent: float, *, to: str | None = None) -> NetworkFault:
        """Drop ``percent`` % of the packets ``target``'s pods send (to ``to``'s pods only, if given)."""
        return self.inject({"kind": "loss", "sources": self.addresses(target), "loss_percent": percent,
                            "to": self.addresses(to) if to else []},
                           f"{percent:g}% of {target}'s packets lost" + (f" to {to}" if to else ""))  # fmt: skip

    def bandwidth(self, target: str, rate: str | float, *, to: str | None = None) -> NetworkFault:
        """Limit what ``target``'s pods send to ``rate`` (``"1mbit"``, ``"500kbit"``, or bits a second)."""
        bits = _rate(rate)
        return self.inject({"kind": "bandwidth", "sources": self.addresses(target), "rate_bps": bits,
                            "to": self.addresses(to) if to else []},
                           f"{target} limited to {rate}" + (f" to {to}" if to else ""))  # fmt: skip

    def partition(self, a: str, b: str, *, both: bool = True) -> NetworkFault:
        """Cut ``a``'s pods off from ``b``'s: packets from a to b are dropped, and (``both``) from b to a."""
        arrow = "<->" if both else "->"
        return self.inject({"kind": "partition", "sources": self.addresses(a), "to": self.addresses(b), "both": both},
                           f"partition {a} {arrow} {b}")  # fmt: skip

    def heal(self, quiet: bool = False) -> None:
        """Remove every network fault this lab injected."""
        for fault in list(self.injected.values()):
            fault.remove(quiet=quiet)

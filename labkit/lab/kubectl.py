"""The real kubectl, run in the lab's namespace, its output shown as a terminal would."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from labkit.errors import LabkitError

if TYPE_CHECKING:
    from labkit.lab.context import LabContext

# kubectl verbs that change the cluster: a trainee's action, for time-to-recover figures
WRITING_VERBS = {"apply", "create", "delete", "edit", "patch", "replace", "scale", "autoscale", "set", "label",
                 "annotate", "rollout", "cordon", "uncordon", "drain", "taint", "expose", "run"}  # fmt: skip
VALUED_FLAGS = {"-n", "--namespace", "-l", "--selector", "-o", "--output", "-f", "--filename", "-c", "--container",
                "--context", "--kubeconfig"}  # fmt: skip


class Output(str):
    """kubectl's output, already shown: a cell that ends with it does not show it twice."""

    def _ipython_display_(self) -> None:
        pass


class Kubectl:
    """``lab.kubectl``: a command that writes counts as the trainee's action."""

    def __init__(self, lab: LabContext) -> None:
        self.lab = lab

    def run(self, args: str | list[str], *, check: bool = False, show: bool = True, input: str | None = None,
                timeout: float = 120) -> Output:  # fmt: skip
        """Run the real kubectl against the lab's namespace (``-n`` is added unless given) and show what it
        prints; its output. ``check=True`` raises if kubectl fails."""
        argv = shlex.split(args) if isinstance(args, str) else list(args)
        if argv and argv[0] == "kubectl":
            argv = argv[1:]
        if not any(a in ("-n", "-A", "--all-namespaces") or a.startswith("--namespace") for a in argv):
            argv = ["-n", self.lab.namespace, *argv]
        command = [*self.lab.cluster.kubectl_command(), *argv]
        if writes(argv):
            self.lab.actions.append(time.time())
        try:
            done = subprocess.run(command, capture_output=True, text=True, input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LabkitError(f"kubectl {' '.join(argv)} did not finish within {timeout:.0f} s.") from None
        except KeyboardInterrupt:
            raise LabkitError(f"Interrupted: kubectl {' '.join(argv)} was stopped.",
                              hint="What it changed before it stopped stays changed.") from None  # fmt: skip
        if show:
            if done.stdout:
                print(done.stdout, end="" if done.stdout.endswith("\n") else "\n", flush=True)
            if done.stderr:
                print(done.stderr, end="" if done.stderr.endswith("\n") else "\n", file=sys.stderr, flush=True)
        if check and done.returncode != 0:
            raise LabkitError(f"kubectl {' '.join(argv)} failed: {done.stderr.strip() or done.returncode}")
        return Output(done.stdout)


def writes(argv: list[str]) -> bool:
    """Whether a kubectl command line changes the cluster (``scale``, ``rollout undo``; not ``get``)."""
    words = [a for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] not in VALUED_FLAGS)]
    if not words or words[0] not in WRITING_VERBS:
        return False
    return words[0] != "rollout" or (len(words) > 1 and words[1] in ("undo", "restart", "pause", "resume"))

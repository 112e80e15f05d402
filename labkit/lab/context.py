"""What a lab's parts may use of the lab they belong to: a small interface, not the ``Lab``'s insides.

The parts (``waiting``, ``kubectl``, ``events``, ``reach``, ``faults``, ``nodes``,
``chaos``, ``recovery``, ``view``) and the graded checks (``labkit.checks``) each
take a ``LabContext``: the lab's identity and namespace, its cluster, its requests
(which explain a deleted namespace), the objects it reads and applies, and two
records (when the trainee acted; what was measured). ``Lab`` is one; a test may
pass another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from labkit.kube.config import Cluster
    from labkit.lab.recovery import Recovery
    from labkit.manifests import Kind


class LabContext(Protocol):
    id: str  # the lab's id, "01-deploy-and-scale"
    run_id: str  # this run's, in labels and the results file
    namespace: str
    cluster: Cluster
    shared: bool  # working in a namespace it did not make (a trainee's own, a grading run's)
    grading: bool  # the grader's own kernel (``labkit.course.execute``)
    actions: list[float]  # when the trainee changed something (time.time()), for the recovery figures
    recoveries: list[Recovery]  # what ``measure`` recorded

    def request(self, method: str, path: str, body: Any = None, **options: Any) -> dict: ...

    def say(self, message: str) -> None: ...

    def locate(self, target: str) -> tuple[Kind, str]: ...

    def get(self, target: str) -> dict | None: ...

    def pods(self, selector: str | None = None) -> list[dict]: ...

    def pods_of(self, target: str) -> list[dict]: ...

    def nodes(self) -> list[dict]: ...

    def apply(self, manifest: Any, *, action: bool = True) -> list[str]: ...

    def wait_ready(self, *targets: str, timeout: float = ...) -> None: ...

    def event_list(self) -> list[dict]: ...

"""The notebook API: a lab, one run of one lab notebook, in a namespace of its own, on whichever cluster is at hand.

``start_lab("01-deploy-and-scale")`` connects (``labkit.kube.config``), makes a
fresh namespace for this run and returns the ``Lab`` that every later cell uses:
``apply`` manifests, ``wait_ready`` for rollouts with a live status line, run
real ``kubectl`` in the lab's namespace, read ``events`` as a timeline, reach a
pod's HTTP port with ``http``, inject faults with ``chaos``, ``measure`` time to
detect and to recover, and watch nodes and pods in a live ``view``.

Running the first cell again is harmless: the lab carries on in its namespace.
The namespace goes when the lab is closed or the kernel exits, so every run
(a trainee's, or a grader's re-execution of a submission) starts from nothing
and builds what it is graded on. Where the credentials may not create
namespaces (a trainee's service account on JupyterHub), the lab works in the
account's own namespace and removes what it made, by label, instead.

``session`` holds ``Lab`` and ``start_lab``; each part is a module of its own,
working through ``context.LabContext``: ``waiting``, ``kubectl``, ``events``,
``reach``, ``faults``, ``nodes``, ``chaos``, ``recovery``, ``view``, and
``namespaces`` (making, owning and sweeping them).
"""

from labkit.lab.events import in_time_order
from labkit.lab.namespaces import LAB_LABEL, RUN_LABEL
from labkit.lab.reach import Response
from labkit.lab.session import Lab, slug, start_lab

__all__ = ["LAB_LABEL", "RUN_LABEL", "Lab", "Response", "in_time_order", "slug", "start_lab"]

"""Forged submissions: answer cells that try to earn points without doing the work.

Each forgery deploys nothing and answers every question wrongly (or not at
all), then tries to make the grade say otherwise. Every point one of them scores
is a point it did not earn. They are the attacks a trainee who reads labkit's
source could mount from their own kernel, which is where nbgrader runs hidden tests.
"""

from __future__ import annotations

# Checks replaced: every function of labkit.checks does nothing but say "✔".
REPLACED_CHECKS = '''
from labkit import checks as _checks
def _always(*args, **kwargs):
    print("✔ looks right")
for _name in dir(_checks):
    if not _name.startswith("_") and callable(getattr(_checks, _name)) and _name not in ("CheckFailed",):
        setattr(_checks, _name, _always)
store_component = placement_component = "no idea"
ready_nodes = 0
'''

# The client patched: the lab reads a Deployment, its pods and their answers from a dict of the forger's making.
PATCHED_CLIENT = '''
import labkit.lab as _lab_module
_fake = {
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": "web", "uid": "forged", "annotations": {}},
    "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
             "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{
                 "name": "web", "image": "labkit/web:1.0", "ports": [{"containerPort": 8080}],
                 "env": [{"name": "MESSAGE", "valueFrom": {"configMapKeyRef": {"name": "web-config", "key": "MESSAGE"}}}],
                 "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080}, "periodSeconds": 1},
                 "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}}},
    "status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "availableReplicas": 2},
}
_replicas = {"n": 2}
def _get(self, target):
    if target.startswith("configmap"):
        return {"metadata": {"name": "web-config"}, "data": {"MESSAGE": "Hello from the lab"}}
    _fake["spec"]["replicas"] = _replicas["n"]
    return _fake
_lab_module.Lab.get = _get
_lab_module.Lab.wait_ready = lambda self, *targets, **options: print("✔ ready")
_lab_module.Lab.http = lambda self, *args, **kwargs: _lab_module.Response(200, "Hello from the lab 2.0")
_lab_module.Lab.pods = lambda self, selector=None: []
_lab_module.Lab.kubectl = lambda self, args, **kwargs: _replicas.update(n=int(args.rsplit("=", 1)[1])) if "scale" in args else None
store_component = placement_component = "no idea"
ready_nodes = 0
'''

# Builtins redefined, and answers that are objects equal to anything.
REDEFINED_BUILTINS = '''
import builtins
class _Anything(str):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __hash__(self): return 0
    def strip(self): return self
    def lower(self): return self
builtins.sum = lambda *args, **kwargs: 0       # the hidden check counts ready nodes with sum(...)
builtins.min = lambda *args, **kwargs: 0       # ... and fits pods on a node with min(...)
store_component = placement_component = _Anything("no idea")
ready_nodes = 0
'''

# Every error silenced: IPython's custom exception handler swallows what failing checks raise, so no
# cell shows an error output (nbgrader's sign of a failed test).
SILENCED_ERRORS = '''
get_ipython().set_custom_exc((BaseException,), lambda shell, kind, value, tb, tb_offset=None: [])
store_component = placement_component = "no idea"
ready_nodes = 0
'''

# Fake results: the measurements file says every fault was detected and recovered at once.
FAKE_RESULTS = '''
import json
json.dump({"runs": {"forged": {"lab": "forged", "namespace": "x", "recoveries": [
    {"fault": "a node is lost", "target": "deployment/api", "started": 1.0, "detected": 1.1, "acted": None,
     "recovered": 1.2, "notes": [], "ttd": 0.1, "ttr": 0.2}]}}}, open("labkit-results.json", "w"))
store_component = placement_component = "no idea"
ready_nodes = 0
'''

# The kernel exits: nothing after this cell runs in it.
EXITS_KERNEL = '''
import os
store_component = placement_component = "no idea"
ready_nodes = 0
os._exit(0)
'''

LAB01 = {
    "replaced-checks": {"task1-answer": REPLACED_CHECKS},
    "patched-client": {"task1-answer": PATCHED_CLIENT},
    "redefined-builtins": {"task1-answer": REDEFINED_BUILTINS},
    "silenced-errors": {"task1-answer": SILENCED_ERRORS},
    "fake-results": {"task1-answer": FAKE_RESULTS},
    "exits-kernel": {"task1-answer": EXITS_KERNEL},
}

# Out of the kernel: the answer key, the grading cluster's admin credentials, the gradebook, another trainee's
# namespace, this machine's software, and a process left to act after grading. What it manages is printed.
ESCAPES = '''
import glob, json, subprocess, sys
from pathlib import Path
from labkit.course.root import REPOSITORY
from labkit.paths import sandboxes_root

def attempt(action):
    try:
        return action() or "done"
    except Exception as exc:
        return f"blocked ({type(exc).__name__})"

report = {}
source = REPOSITORY / "notebooks" / "01-deploy-and-scale" / "deploy-and-scale.ipynb"
report["read the hidden tests"] = attempt(lambda: "read" if "HIDDEN TESTS" in source.read_text() else "no tests in it")
report["read an admin kubeconfig"] = attempt(lambda: [open(p).read() and "read" for p in glob.glob(str(sandboxes_root() / "*" / "kubeconfig"))][0])
course = Path.cwd().parents[2]
report["write beside the gradebook"] = attempt(lambda: (course / "forged.txt").write_text("x") and "written")
report["write into this Python"] = attempt(lambda: (Path(sys.prefix) / "forged.pth").write_text("") and "written")
from labkit.kube.config import connect
report["list another namespace"] = attempt(lambda: connect().request("GET", "/api/v1/namespaces/default/pods") and "listed")
late = Path.cwd() / "late.txt"  # its own folder: it may write there, but only while its kernel lives
subprocess.Popen(["sh", "-c", f"while true; do date +%s%N > {late}; sleep 0.5; done"], start_new_session=True)
print("ESCAPES " + json.dumps(report))
store_component = placement_component = "no idea"
ready_nodes = 0
'''

"""The ``labkit`` command.

``labkit sandbox install|up|env|kubeconfig|status|logs|down|list`` manages local
sandbox clusters; ``labkit course release|collect|autograde|feedback|scores|recoveries`` runs
the grading pipeline. Expected problems print one clear message and exit 1; only bugs
show a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
import time
from pathlib import Path

from labkit.errors import LabkitError
from labkit.progress import format_duration


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _human_bytes(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n else "-"


def cmd_install(args: argparse.Namespace) -> int:
    from labkit.sandbox import binaries

    tools = binaries.install(
        Path(args.from_dir).expanduser() if args.from_dir else None,
        force=args.force,
        build=not args.no_build,
        download=not args.no_download,
        say=_say,
    )
    _say(f"kubectl: {tools['kubectl']}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from labkit.sandbox.controlplane import Sandbox

    Sandbox(args.name).up(say=_say, timeout=args.timeout, nodes=args.nodes)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from labkit.sandbox.controlplane import Sandbox

    Sandbox(args.name).down(purge=args.purge, say=_say)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from labkit.sandbox.controlplane import Sandbox

    for key, value in Sandbox(args.name).env().items():
        print(f"export {key}={shlex.quote(value)}")
    print("# Run: eval \"$(labkit sandbox env" + ("" if args.name == "default" else f" --name {args.name}") + ")\"")
    return 0


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    from labkit.sandbox.controlplane import Sandbox

    sys.stdout.write(Sandbox(args.name).kubeconfig_text())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from labkit.sandbox.controlplane import Sandbox

    info = Sandbox(args.name).status()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if info["running"] else 3
    if not info["exists"]:
        print(f"Sandbox {args.name!r} does not exist. Start it with `labkit sandbox up`.")
        return 3
    state = "running" if info["running"] else "stopped"
    uptime = f", up {format_duration(info['uptime'])}" if info.get("uptime") else ""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    print(f"Sandbox {info['name']!r}: {state}{uptime} ({versions})")
    print(f"  API server: {info['server']}   kubeconfig: {info['kubeconfig']}")
    header = f"  {'COMPONENT':<25}{'STATE':<20}{'PID':>8}{'PORT':>7}  {'UPTIME':<9}{'RESTARTS':>9}{'MEMORY':>9}  {'HEALTH':<8}LAST EXIT"
    print(header)
    for c in info["components"]:
        health = {True: "ok", False: "failing", None: "-"}[c["healthy"]]
        uptime = format_duration(c["uptime"]) if c["uptime"] else "-"
        print(
            f"  {c['name']:<25}{c['state']:<20}{c['pid'] or '-':>8}{c['port'] or '-':>7}  {uptime:<9}"
            f"{c['restarts']:>9}{_human_bytes(c['memory']):>9}  {health:<8}{c['last_exit'] or '-'}"
        )
    print(f"  total memory: {_human_bytes(info['memory'])}")
    network = info.get("network")
    if network:
        modes = {"root": "pods have their own addresses, on a network this machine's root made",
                 "rootless": "pods have their own addresses, on a network made in a user namespace (no root)"}  # fmt: skip
        said = modes.get(network["mode"], network.get("problem") or network["mode"])
        print(f"  pod network: {network['mode']}: {said}" + (f"; cluster DNS {network['dns']}" if network.get("dns") else ""))
    return 0 if info["running"] else 3


def cmd_url(args: argparse.Namespace) -> int:
    from labkit.sandbox.controlplane import Sandbox

    print(Sandbox(args.name).service_url(args.namespace, args.service, args.port))
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from labkit.sandbox.controlplane import Sandbox

    Sandbox(args.name).set_node_running(args.node, args.action == "start", say=_say)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from labkit.sandbox.controlplane import Sandbox

    path = Sandbox(args.name).log_path(args.component)
    lines = path.read_text(errors="replace").splitlines()
    for line in lines[-args.tail :] if args.tail else lines:
        print(line)
    if args.follow:
        with open(path, errors="replace") as handle:
            handle.seek(0, 2)
            try:
                while True:
                    line = handle.readline()
                    if line:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                    else:
                        time.sleep(0.2)
            except KeyboardInterrupt:
                return 0
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from labkit.sandbox.state import all_sandboxes

    sandboxes = all_sandboxes()
    if not sandboxes:
        print("No sandboxes. Start one with `labkit sandbox up`.")
    for state in sandboxes:
        print(f"{state.name:<20} {'running' if state.supervisor_pid() else 'stopped':<8} {state.root}")
    return 0


def _course(args: argparse.Namespace):  # noqa: ANN202 - a labkit.course.Course
    from labkit.course import Course

    return Course(Path(args.root) if args.root else None,
                  exchange=Path(args.exchange_root) if getattr(args, "exchange_root", None) else None)  # fmt: skip


def _score_table(results: list) -> None:
    if not results:
        print("No graded submissions.")
        return
    width = max(len("TRAINEE"), *(len(r.student) for r in results))
    print(f"{'TRAINEE':<{width}}  {'SCORE':>9}  NOT PASSED")
    for r in results:
        print(f"{r.student:<{width}}  {f'{r.score:g}/{r.max_score:g}':>9}  {', '.join(r.failed) or '-'}")
    flagged = [r for r in results if r.flags]
    if flagged:
        print("\nFLAGGED for a look (their tasks need manual grading in the gradebook):")
        for r in flagged:
            for flag in r.flags:
                print(f"  {r.student}: {flag}")


def cmd_course_release(args: argparse.Namespace) -> int:
    _course(args).release(args.lab, exchange=args.exchange, say=_say)
    return 0


def cmd_course_collect(args: argparse.Namespace) -> int:
    _course(args).collect(args.lab, say=_say)
    return 0


def cmd_course_autograde(args: argparse.Namespace) -> int:
    results = _course(args).autograde(args.lab, [Path(p) for p in args.submissions] or None, cluster=args.cluster,
                                      parallel=args.parallel, keep=args.keep_sandbox, say=_say)  # fmt: skip
    _score_table(results)
    return 0


def cmd_course_feedback(args: argparse.Namespace) -> int:
    _course(args).feedback(args.lab, exchange=args.exchange, say=_say)
    return 0


def cmd_course_scores(args: argparse.Namespace) -> int:
    _score_table(_course(args).scores(args.lab))
    return 0


def cmd_course_trainees(args: argparse.Namespace) -> int:
    from labkit.hub import manifests

    print(manifests(args.trainees, prefix=args.prefix), end="")
    return 0


def cmd_course_recoveries(args: argparse.Namespace) -> int:
    from labkit.course import reports

    records = _course(args).recoveries(args.lab, graded=args.graded)
    if not records:
        print("No measurements: the lab records them with lab.measure, in labkit-results.json beside each notebook.")
        return 0
    if args.lab:
        reports.recovery_table("FAULT", reports.grouped(records, "fault"))
    else:
        reports.cohort(records)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labkit", description="Courseware for operating distributed systems.")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    sandbox = groups.add_parser("sandbox", help="manage local sandbox clusters",
                                description="Manage local sandbox clusters: a real Kubernetes control plane.")
    sub = sandbox.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def named(name: str, help_text: str, func) -> argparse.ArgumentParser:  # noqa: ANN001
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--name", default="default", help="sandbox name (default: %(default)s)")
        p.set_defaults(func=func)
        return p

    p = sub.add_parser("install", help="provide the pinned control-plane binaries (find, build or download)")
    p.add_argument("--from", dest="from_dir", metavar="DIR", help="use the binaries in DIR")
    p.add_argument("--force", action="store_true", help="install again even if cached")
    p.add_argument("--no-build", action="store_true", help="do not build with Go")
    p.add_argument("--no-download", action="store_true", help="do not download release archives")
    p.set_defaults(func=cmd_install)

    p = named("up", "start a sandbox (no-op if it runs) and wait until it is ready", cmd_up)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    p.add_argument("--nodes", type=int, default=None,
                   help="how many nodes the node agent registers (kept for later `up`s; default 3)")
    p = named("down", "stop a sandbox; its cluster state is kept unless --purge", cmd_down)
    p.add_argument("--purge", action="store_true", help="also delete its state (certificates, etcd data, logs)")
    named("env", "print shell exports that point kubectl at a sandbox", cmd_env)
    named("kubeconfig", "print a sandbox's admin kubeconfig", cmd_kubeconfig)
    p = named("status", "show components, ports, uptime, restarts and memory", cmd_status)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = named("logs", "print a component's log", cmd_logs)
    p.add_argument("component", help="etcd, kube-apiserver, kube-controller-manager, kube-scheduler or supervisor")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--tail", type=int, default=0, help="only the last N lines")
    p = named("url", "print a URL on this machine that leads to a Service (kubectl port-forward's stand-in)", cmd_url)
    p.add_argument("service", help="the Service's name")
    p.add_argument("-n", "--namespace", default="default", help="its namespace (default: %(default)s)")
    p.add_argument("--port", type=int, default=None, help="the Service's port (default: its first)")
    p = named("node", "stop a node as if its machine were lost, or start it again", cmd_node)
    p.add_argument("action", choices=("stop", "start"))
    p.add_argument("node", help="node name, e.g. node-1")
    p = sub.add_parser("list", help="list sandboxes on this machine")
    p.set_defaults(func=cmd_list)

    course = groups.add_parser("course", help="release labs and grade submissions (nbgrader)",
                               description="Release labs and grade submissions with nbgrader; the course root is "
                                           "graders/ and its source notebooks are notebooks/.")  # fmt: skip
    sub = course.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def step(name: str, help_text: str, func, exchange: bool = False, every_lab: str = "") -> argparse.ArgumentParser:  # noqa: ANN001
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("lab", nargs="?" if every_lab else None,
                       help="the lab, e.g. 01-deploy-and-scale (a unique prefix such as 01 will do)" + every_lab)
        p.add_argument("--root", help="the nbgrader course root (default: $LABKIT_COURSE_ROOT, else graders/)")
        if exchange:
            p.add_argument("--exchange", action="store_true", help="also through the JupyterHub exchange")
        p.add_argument("--exchange-root", help="the exchange folder (default: nbgrader_config.py's)")
        p.set_defaults(func=func)
        return p

    step("release", "make the student version of a lab (solutions and hidden tests removed)", cmd_course_release,
         exchange=True)  # fmt: skip
    step("collect", "collect submissions from the JupyterHub exchange", cmd_course_collect)
    p = step("autograde", "grade submissions by running them again against a fresh cluster", cmd_course_autograde)
    p.add_argument("submissions", nargs="*", help="notebooks, or folders named after trainees (default: all collected)")
    p.add_argument("--cluster", choices=("sandbox", "kubeconfig"), default="sandbox",
                   help="a fresh local sandbox of this run's own, removed when it ends (default), or the cluster "
                        "$KUBECONFIG points at")
    p.add_argument("--keep-sandbox", action="store_true", help="leave the grading sandbox running for a look")
    p.add_argument("--parallel", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                   help="grade N submissions at a time (default: %(default)s, this machine's CPUs up to 4)")
    step("feedback", "write each trainee's graded notebook as HTML feedback", cmd_course_feedback, exchange=True)
    step("scores", "show the gradebook's scores of a lab", cmd_course_scores)
    p = step("recoveries", "the cohort's time to detect, to act and to recover, per fault a lab injected, or lab "
             "after lab", cmd_course_recoveries, every_lab="; without it, every lab, and each trainee's trend")  # fmt: skip
    p.add_argument("--graded", action="store_true", help="from the graded re-runs instead of the trainees' own runs")
    p = sub.add_parser("trainees", help="the YAML that gives each trainee a namespace on a JupyterHub class's cluster",
                       description="Print the manifests that prepare a class's cluster for JupyterHub: per trainee a "
                                   "namespace, the ServiceAccount their JupyterLab pod runs as and a Role for the labs; "
                                   "for the class, read access to nodes. Apply them: "
                                   "`labkit course trainees alice bob | kubectl apply -f -`.")  # fmt: skip
    p.add_argument("trainees", nargs="+", metavar="TRAINEE", help="user names, as KubeSpawner names their namespaces")
    p.add_argument("--prefix", default="lab-", help="namespace = PREFIX + name (default: %(default)s)")
    p.set_defaults(func=cmd_course_trainees)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LabkitError as exc:
        print(f"labkit: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `labkit sandbox status | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        # A folder labkit keeps things in belongs to someone else, or is not a folder: the user's to fix.
        print(f"labkit: cannot use {exc.filename}: {exc.strerror}.\n\nlabkit keeps binaries in "
              "$LABKIT_CACHE_DIR and sandboxes in $LABKIT_STATE_DIR (see the README's \"Where things live\"); "
              "point them at folders you own, or fix that path's owner and permissions.", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            raise
        print(f"labkit: cannot write {exc.filename or 'a file'}: {exc.strerror}.\n\nPoint $LABKIT_STATE_DIR and "
              "$LABKIT_CACHE_DIR at a writable disk with room; `labkit sandbox list` shows the sandboxes that "
              "`labkit sandbox down --purge` would remove.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("labkit: interrupted. A sandbox that was starting goes on starting in the background; "
              "`labkit sandbox status` shows it and `labkit sandbox down` stops it.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

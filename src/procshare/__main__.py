"""``python -m procshare``: list, collect and remove objects; run the demo.

::

    python -m procshare ls [--namespace NS]
    python -m procshare gc [--namespace NS] [--all]
    python -m procshare rm NAME [--lock | --sync] [--namespace NS]
    python -m procshare demo [--processes N] [--repeat K] [--sleep]
"""

from __future__ import annotations

import argparse
import sys

from procshare._engine import inspect, names


def _fmt_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _fmt_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_ls(args: argparse.Namespace) -> int:
    objects = inspect.list_objects(args.namespace)
    if not objects:
        print(f"nothing in namespace {args.namespace or names.current_namespace()!r}")
        return 0
    header = ("NAME", "TYPE", "KIND", "SIZE", "HOLDERS", "OWNER", "AGE", "FLAGS", "STATE")
    rows = [
        (
            o.name or o.os_name,
            o.type,
            o.kind,
            _fmt_size(o.size),
            ",".join(map(str, o.holders)) or "-",
            "-" if o.owner is None else str(o.owner),
            _fmt_age(o.age),
            "persist" if o.persist else "",
            o.state or "",
        )
        for o in objects
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    removed = inspect.collect(args.namespace, everything=args.all)
    for os_name in removed:
        print(f"removed {os_name}")
    print(f"{len(removed)} object(s) removed")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    what = "sync object" if args.sync else "lock" if args.lock else "segment"
    if inspect.remove(args.name, lock=args.lock, namespace=args.namespace, sync=args.sync):
        print(f"removed {what} {args.name!r}")
        return 0
    listed = inspect.list_objects(args.namespace)
    namespace = args.namespace or names.current_namespace()
    other = "segment" if args.lock else "lock"
    hint = ""
    if any(i.name == args.name and i.type == other for i in listed):
        flag = "" if args.lock else "--lock "
        hint = f" (there is a {other} of that name: `python -m procshare rm {flag}{args.name}`)"
    found = [i.type for i in listed if i.name == args.name and i.state is not None]
    if found and not args.sync:
        hint = (
            f" (there is a {found[0]} of that name: `python -m procshare rm --sync {args.name}`)"
        )
    print(f"no {what} named {args.name!r} in namespace {namespace!r}{hint}", file=sys.stderr)
    return 1


_EPILOG = """\
examples:
  python -m procshare ls                      the current namespace's objects
  python -m procshare gc --namespace myapp    clean up after a killed program
  python -m procshare rm results --namespace myapp
  python -m procshare demo --processes 100 --repeat 10

'python -m procshare COMMAND --help' describes a command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from procshare._demo import main as demo_main

        return demo_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m procshare",
        description="List, collect and remove procshare's shared-memory objects; run the demo.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    ns_help = "namespace (default: $PROCSHARE_NAMESPACE or 'default')"
    p_ls = sub.add_parser(
        "ls",
        help="list a namespace's segments, locks and sync objects",
        description="List the segments, locks and coordination objects of a namespace: name, "
        "type, kind, size, "
        "holders, owner, age, and whether it persists.",
    )
    p_ls.add_argument("--namespace", metavar="NS", help=ns_help)
    p_ls.set_defaults(func=cmd_ls)
    p_gc = sub.add_parser(
        "gc",
        help="remove what no living process holds",
        description="Remove the objects of a namespace that no living process holds (left "
        "by processes that were killed). persist=True segments and locks whose holder died "
        "are kept, unless --all.",
    )
    p_gc.add_argument("--namespace", metavar="NS", help=ns_help)
    p_gc.add_argument(
        "--all",
        action="store_true",
        help="also remove persist=True segments and locks whose holder died",
    )
    p_gc.set_defaults(func=cmd_gc)
    p_rm = sub.add_parser(
        "rm",
        help="remove one segment, lock (--lock) or sync object (--sync) now",
        description="Remove one segment (or, with --lock or --sync, one lock or "
        "coordination object) by name now, whoever "
        "holds it: processes that have it mapped keep their memory until they close it, "
        "and the next open by name creates a new one.",
    )
    p_rm.add_argument(
        "name", metavar="NAME", help="the name given to ps.shared or ps.interprocess_lock"
    )
    p_rm.add_argument("--lock", action="store_true", help="NAME is a lock, not a segment")
    p_rm.add_argument(
        "--sync",
        action="store_true",
        help="NAME is a semaphore, event, condition, barrier, rwlock or queue",
    )
    p_rm.add_argument("--namespace", metavar="NS", help=ns_help)
    p_rm.set_defaults(func=cmd_rm)
    sub.add_parser("demo", help="run the seed scenario and check it (demo --help for options)")
    args = parser.parse_args(argv)
    try:
        result = int(args.func(args))
    except Exception as exc:  # a clear one-line error, not a traceback, for a CLI
        print(f"procshare: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    raise SystemExit(main())

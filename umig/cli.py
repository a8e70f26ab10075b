"""umig's command line: agent, migrate, dump, restore, show, check, and the scheduler's nodes, run, top."""
import argparse
import gc
import json
import os
import sys
import time
import traceback

from umig import dump, image
from umig.errors import UmigError


def _human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def _report(result, as_json, verb):
    if as_json:
        print(json.dumps(result))
    else:
        print(f"{verb} pid {result['source_pid']} to {result['target']}: pid {result['target_pid']} there; "
              f"{result['pages']} pages ({_human_bytes(result['bytes'])}) in {result['total_s']:.3f} s, "
              f"frozen {result['frozen_s']:.3f} s")


def _options(pairs, what):
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UmigError(f"{what} wants KEY=VALUE, not {pair!r}")
        options[key.replace("-", "_")] = value
    return options


def cmd_agent(args):
    from umig import agent
    scheduling = {"peers": args.peer, "cluster_file": args.cluster, "publish": args.publish,
                  "interval": args.interval, "node_timeout": args.node_timeout, "balance": args.balance,
                  "balance_options": _options(args.balance_opt, "--balance-opt"),
                  "rules": {"uids": args.eligible_uid, "cgroups": args.eligible_cgroup, "names": args.eligible_name}}
    scheduling.update(_options(args.guard, "--guard"))
    agent.run(args.listen, args.name, scheduling)


def cmd_nodes(args):
    from umig import jobs, top
    view = jobs.request(args.agent, "nodes", "nodes")
    if args.json:
        print(json.dumps(view))
    else:
        print("\n".join(top.render(view, width=100)))


def cmd_run(args):
    from umig import jobs
    if not args.command_argv:
        raise UmigError("umig run wants a command")
    argv = args.command_argv[1:] if args.command_argv[0] == "--" else args.command_argv
    return jobs.run(args.agent, argv, args.stdout, args.stderr, args.detach, args.json)


def cmd_top(args):
    from umig import top
    top.main(args.agent, args.interval, args.once)


def cmd_migrate(args):
    from umig.migrate import migrate
    gc.freeze()  # as in the agent: no full collection of the imports' objects within the freeze
    _report(migrate(args.pid, args.target, args.pid_mode, args.timeout, live=args.live, lazy=args.lazy,
                    codec=args.compress, tracking=args.tracking,
                    notice=lambda line: print(f"umig: note: {line}", file=sys.stderr)), args.json, "migrated")


def cmd_dump(args):
    started = time.monotonic()
    dump.refuse_blocked(args.pid)
    sink = image.FileSink(args.output)  # before freezing: an unwritable path costs the process nothing
    frozen = None
    try:
        frozen = dump.freeze(args.pid)
        writer = image.ImageWriter(sink)
        state, runs = dump.collect(frozen)
        dump.write_image(writer, frozen, state, runs)
        sink.commit()
    except BaseException:
        try:
            if frozen is not None:
                frozen.thaw()
        finally:
            sink.discard()
        raise
    if args.leave_running:
        frozen.thaw()
    else:
        frozen.release()
    print(f"dumped pid {args.pid} to {args.output}: {writer.pages} pages ({_human_bytes(writer.bytes)}) "
          f"in {time.monotonic() - started:.3f} s, frozen {time.monotonic() - frozen.stopped_at:.3f} s"
          f"{'; left running' if args.leave_running else '; the process was ended'}")


def cmd_restore(args):
    from umig.restore import restore
    started = time.monotonic()
    reader = image.open_image_file(args.file)
    restored = restore(reader, args.pid_mode)
    restored.resume()
    elapsed = round(time.monotonic() - started, 6)
    _report({"source_pid": restored.state["pid"], "target": "local", "target_pid": restored.pid,
             "pages": reader.pages, "bytes": reader.bytes, "total_s": elapsed, "frozen_s": elapsed},
            args.json, "restored")


def cmd_show(args):
    reader = image.open_image_file(args.file)
    header = next(reader).meta
    state = next(reader).meta
    batches = 0
    for record in reader:
        batches += record.kind == "pages"
    print(f"umig image version {header['version']}, made {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(header['created']))} "
          f"on {header['host']} (Linux {header['kernel']})")
    print("\n".join(dump.describe(state)))
    print(f"pages: {reader.pages} ({_human_bytes(reader.bytes)}) in {batches} batches; every checksum verified")


def cmd_check(args):
    blockers = dump.check(args.pid)
    if not blockers:
        print(f"pid {args.pid} can be migrated")
        return 0
    print(f"pid {args.pid} cannot be migrated:")
    for blocker in blockers:
        print(f"  {blocker}")
    return 1


def parser():
    p = argparse.ArgumentParser(prog="umig", description="Move a running Linux process to another host.")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("agent", help="run the node daemon that receives and restores migrations")
    a.add_argument("--listen", default="tcp://127.0.0.1:7707", help="ZeroMQ endpoint (default: %(default)s)")
    a.add_argument("--name", help="this node's name (default: the host name)")
    a.add_argument("--peer", action="append", default=[], metavar="ENDPOINT",
                   help="another agent of the cluster (repeat); its load is read from its port + 1")
    a.add_argument("--cluster", metavar="FILE", help="a file of agent endpoints, one a line")
    a.add_argument("--publish", metavar="ENDPOINT", help="where to publish this node's load (default: with peers, "
                                                         "the listening port + 1)")
    a.add_argument("--interval", type=float, help="seconds between load samples (default: 1)")
    a.add_argument("--node-timeout", type=float, help="seconds of silence before a peer leaves the view (default: 5)")
    a.add_argument("--balance", metavar="POLICY", help="move processes by POLICY: none, threshold, age, memory or "
                                                       "module:Class (default: none)")
    a.add_argument("--balance-opt", action="append", metavar="KEY=VALUE", help="an option of the policy (repeat)")
    a.add_argument("--guard", action="append", metavar="KEY=VALUE",
                   help="process_interval, node_interval, hysteresis or cooldown (see docs/scheduling.md)")
    a.add_argument("--eligible-uid", type=int, action="append", default=[], metavar="UID",
                   help="processes of this uid may be moved, besides umig run's jobs")
    a.add_argument("--eligible-cgroup", action="append", default=[], metavar="PATH",
                   help="processes whose cgroup path contains PATH may be moved")
    a.add_argument("--eligible-name", action="append", default=[], metavar="PATTERN",
                   help="processes whose name matches the shell PATTERN may be moved")
    a.set_defaults(func=cmd_agent)

    agent_option = dict(default="tcp://127.0.0.1:7707", help="the agent to ask (default: %(default)s)")
    n = sub.add_parser("nodes", help="the cluster as an agent sees it")
    n.add_argument("--agent", **agent_option)
    n.add_argument("--json", action="store_true", help="print one JSON object")
    n.set_defaults(func=cmd_nodes)

    j = sub.add_parser("run", help="start a command as a job the scheduler may move; wait for it")
    j.add_argument("--agent", **agent_option)
    j.add_argument("--stdout", metavar="FILE", help="the job's stdout (default: passed on to this command's)")
    j.add_argument("--stderr", metavar="FILE", help="the job's stderr (default: passed on to this command's)")
    j.add_argument("--detach", action="store_true", help="print the job and return at once")
    j.add_argument("--json", action="store_true", help="print the job's record as JSON")
    j.add_argument("command_argv", nargs=argparse.REMAINDER, metavar="CMD ...")
    j.set_defaults(func=cmd_run)

    t = sub.add_parser("top", help="live view of the cluster: load, processes, migrations")
    t.add_argument("--agent", **agent_option)
    t.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default: %(default)s)")
    t.add_argument("--once", action="store_true", help="print one frame and return")
    t.set_defaults(func=cmd_top)

    def pid_mode_option(parser_):
        parser_.add_argument("--pid", dest="pid_mode", choices=("keep", "any"), default="keep",
                             help="keep: the process keeps its PID (in a new PID namespace if it is taken); "
                                  "any: take whatever PID comes (default: keep)")

    m = sub.add_parser("migrate", help="move a running process to an agent")
    m.add_argument("pid", type=int)
    m.add_argument("target", help="HOST, HOST:PORT or tcp://HOST:PORT of the target agent")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the agent (default: %(default)s)")
    m.add_argument("--compress", choices=("lz4", "zstd", "none"),
                   help="compress page batches on the wire (default: none on loopback, lz4 elsewhere)")
    m.add_argument("--tracking", choices=("userfaultfd", "hashes"), default="userfaultfd",
                   help="how --live finds pages written meanwhile: userfaultfd write-protect (falls back "
                        "to hashes where the kernel lacks it) or page hashes (default: %(default)s)")
    mode = m.add_mutually_exclusive_group()
    mode.add_argument("--live", action="store_true",
                   help="pre-copy: copy memory while the process runs, then freeze it only for the rest")
    mode.add_argument("--lazy", action="store_true",
                   help="post-copy: resume the process on the target at once; its memory follows on demand")
    pid_mode_option(m)
    m.set_defaults(func=cmd_migrate)

    d = sub.add_parser("dump", help="write a process's image to a file")
    d.add_argument("pid", type=int)
    d.add_argument("-o", "--output", required=True)
    d.add_argument("--leave-running", action="store_true", help="resume the process after the dump")
    d.set_defaults(func=cmd_dump)

    r = sub.add_parser("restore", help="rebuild a process from an image file")
    r.add_argument("file")
    r.add_argument("--json", action="store_true")
    pid_mode_option(r)
    r.set_defaults(func=cmd_restore)

    s = sub.add_parser("show", help="describe an image file")
    s.add_argument("file")
    s.set_defaults(func=cmd_show)

    c = sub.add_parser("check", help="list what would block migrating a process")
    c.add_argument("pid", type=int)
    c.set_defaults(func=cmd_check)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UmigError as e:
        print(f"umig: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("umig: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (umig show FILE | head): nothing is wrong, nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except Exception as e:  # a bug: one line, the trace only when asked for
        if os.environ.get("UMIG_DEBUG"):
            traceback.print_exc()
        print(f"umig: internal error: {type(e).__name__}: {e} (set UMIG_DEBUG=1 for the trace)", file=sys.stderr)
        return 2

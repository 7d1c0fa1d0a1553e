"""The ``sidecar`` command line (also ``python -m sidecar``).

Subcommands, as fixed in DESIGN.md:

- ``serve``: run the proxy (data and admin ports) until SIGTERM.
- ``check-policy FILE``: validate a manifest, print a summary or every error.
- ``simulate``: replay a key trace against the memory tier's eviction policy.
- ``artifacts index DIR...``: hash model files for serving by digest.
- ``stats``: a terminal summary of the live read models.

Precedence for ``serve``: flags > environment (``SIDECAR_*``) > manifest >
built-in defaults. Exit codes: 0 success, 1 a check or command failed, 2 bad
usage or a configuration that cannot start. No command prints a traceback
for a user error.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Sequence

from sidecar import log

DEFAULT_DATA_DIR = ".sidecar-data"


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the proxy until SIGTERM")
    p.add_argument("--policy", help="manifest file (default: $SIDECAR_POLICY,"
                   " else policies/default.yaml if present, else built-in defaults)")
    p.add_argument("--upstream", help="upstream URL, or comma-separated replica URLs")
    p.add_argument("--listen", help="data port host:port (default 127.0.0.1:8090)")
    p.add_argument("--admin-listen", help="admin port host:port (default 127.0.0.1:8091)")
    p.add_argument("--data-dir", help=f"state folder (default $SIDECAR_DATA_DIR or {DEFAULT_DATA_DIR})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="Performance-guardrail reverse proxy for LLM inference servers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    p = sub.add_parser("check-policy", help="validate a manifest file")
    p.add_argument("file")
    sub.add_parser("simulate", help="replay a key trace against eviction policies",
                   add_help=False)
    sub.add_parser("artifacts", help="artifacts index DIR...: hash model files",
                   add_help=False)
    sub.add_parser("stats", help="terminal summary of the read models", add_help=False)
    return parser


def _configure_logging() -> None:
    fmt = os.environ.get("SIDECAR_LOG_FORMAT", "text")
    level = os.environ.get("SIDECAR_LOG_LEVEL", "INFO")
    if fmt not in ("text", "json"):
        print(f"sidecar: SIDECAR_LOG_FORMAT must be text or json, got {fmt!r}", file=sys.stderr)
        fmt = "text"
    try:
        log.configure(fmt, level)
    except ValueError:
        print(f"sidecar: SIDECAR_LOG_LEVEL {level!r} is not a log level", file=sys.stderr)
        log.configure(fmt, "INFO")


def _serve(args: argparse.Namespace) -> int:
    from sidecar.app import Sidecar, build_manifest_loader
    from sidecar.errors import ManifestError, SidecarError
    from sidecar.manifest import resolve_policy_path

    env = dict(os.environ)
    flags = {"upstream": args.upstream, "listen": args.listen, "admin_listen": args.admin_listen}
    path = resolve_policy_path(args.policy, env)
    loader = build_manifest_loader(path, env, flags)
    try:
        manifest = loader()
    except ManifestError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    data_dir = args.data_dir or env.get("SIDECAR_DATA_DIR") or DEFAULT_DATA_DIR

    async def run() -> int:
        sidecar = Sidecar(manifest, data_dir=data_dir, reload_manifest=loader)
        try:
            await sidecar.start()
        except SidecarError as exc:
            print(f"sidecar: {exc}", file=sys.stderr)
            await sidecar.close()
            return 2
        # Everything built so far lives as long as the process: move it out
        # of the collector's sight, so a full collection scans only what
        # requests allocate, and run the youngest generation less often.
        # Both shorten the pauses that show up as tail latency on streams.
        gc.freeze()
        gc.set_threshold(10_000, 20, 20)
        await sidecar.serve_until_signalled()
        return 0

    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _configure_logging()
    if argv and argv[0] == "simulate":
        from sidecar.cache.simulate import main as simulate_main

        return simulate_main(argv[1:])
    if argv and argv[0] == "artifacts":
        from sidecar.artifacts.cli import main as artifacts_main

        return artifacts_main(argv[1:])
    if argv and argv[0] == "stats":
        from sidecar.stats_cli import main as stats_main

        return stats_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check-policy":
        from sidecar.manifest import check_policy

        return check_policy(args.file)
    return 2

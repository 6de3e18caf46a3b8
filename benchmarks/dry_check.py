"""Check one command of benchmarks/gpu_session.sh without running it (its ``dry`` mode).

    python benchmarks/dry_check.py benchmarks/bench_search.py --device cuda ...   # a script
    python benchmarks/dry_check.py -m rolekd.cli run configs/gpu-mini.yaml ...   # a module
    python benchmarks/dry_check.py --batch FILE                                   # every command in FILE

``--batch``: one command per line (shell words), each checked as above in this one process (torch and rolekd
are imported once, not once per command); each prints its own ``dry: ok`` line; the exit status is 1 when
any failed.

The script or module is imported and run up to its argument parser, which parses the command's
arguments and then stops the run (exit 0), so a renamed flag, a missing script or an import error fails
the check with argparse's own message (exit 2) or the traceback (exit 1). For ``rolekd`` commands with a
config the config and its ``key=value`` overrides are loaded and validated too (a renamed key fails).
"""

from __future__ import annotations

import argparse
import runpy
import sys


class Parsed(SystemExit):
    """Raised after a successful parse: the command is not run."""


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    module = argv[0] == "-m"
    target, args = (argv[1], argv[2:]) if module else (argv[0], argv[1:])
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, a=None, namespace=None):
        ns = parse(self, a, namespace)
        if target.startswith("rolekd") and hasattr(ns, "overrides"):
            from rolekd.cli import _config, _split_config_arg
            from rolekd.errors import UserError

            _split_config_arg(ns)
            try:
                _config(ns)
            except UserError as e:
                print(f"dry: {target}: {e}", file=sys.stderr)
                raise SystemExit(2) from None
        raise Parsed(0)

    argparse.ArgumentParser.parse_args = parse_then_stop
    sys.argv = [target] + args
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except Parsed:
        print(f"dry: ok {target} {' '.join(args)}")
        return 0
    finally:
        argparse.ArgumentParser.parse_args = parse
    print(f"dry: {target} ran to its end without parsing arguments", file=sys.stderr)
    return 1


def batch(path: str) -> int:
    import shlex

    failed = 0
    for line in open(path):
        if not line.strip():
            continue
        argv = shlex.split(line)
        name, argv = argv[0], argv[1:]
        try:
            rc = main(argv)
        except SystemExit as e:  # a parser's own error (exit 2) or a script's exit
            rc = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # an import error or a bug in the script: its message, then the next command
            print(f"dry: {' '.join(argv)}: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 1
        if rc:
            print(f"dry: FAILED {name}", file=sys.stderr)
            failed = 1
    return failed


if __name__ == "__main__":
    if sys.argv[1:2] == ["--batch"]:
        sys.exit(batch(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))

"""Check one command of benchmarks/gpu_session.sh without running it (its ``dry`` mode).

    python benchmarks/dry_check.py benchmarks/bench_search.py --device cuda ...   # a script
    python benchmarks/dry_check.py -m rolekd.cli run configs/gpu-mini.yaml ...   # a module

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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

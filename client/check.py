"""``fedbus-site-check``: is this hospital's data ready to join the federation?

    python -m client.check --data PATH [--format auto|BrEaST|BUSI|BUS-UCLM|UDIAT|manifest]

Prints the site report (classes, sizes, masks, duplicates, every issue with its file).
Exit status: 0 ok, 1 data errors (or no usable image), 2 usage errors. No Flower import.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.data import FORMATS, canonical_format
from common.data.check import check_site
from common.records import DataError


def _format_arg(text: str) -> str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return canonical_format(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedbus-site-check",
                                     description="Check a site's breast-ultrasound data.")
    parser.add_argument("--data", required=True, type=Path,
                        help="the site's data folder (or a manifest CSV)")
    parser.add_argument("--format", default="auto", type=_format_arg,
                        help=f"layout: auto (detect) or one of {', '.join(FORMATS)}")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage message
        return 0 if exc.code in (0, None) else 2
    if not args.data.exists():
        print(f"fedbus-site-check: {args.data}: no such file or folder", file=sys.stderr)
        return 2
    try:
        report = check_site(args.data, args.format)
    except (DataError, ValueError) as exc:
        print(f"fedbus-site-check: {exc}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

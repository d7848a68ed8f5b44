"""``fedbus-site-check``: is this hospital's data ready to join the federation?

    python -m client.check --data PATH [--format auto|BrEaST|BUSI|BUS-UCLM|UDIAT|manifest]
    python -m client.check --config site.yaml [--skip-invalid]   # data.path, format, exclude

Prints the site report (classes, sizes, masks, duplicates, every issue with its file, the files
the site YAML's ``data.exclude`` leaves out) and the images per kind of annotation: mask and
label, label only, mask only, normal (``SiteReport.annotations``; a site with labels only still
takes part in training). ``--skip-invalid``: invalid files are listed as
skipped and do not fail the check (the site would train on the valid cases).
Exit status (deploy/README.md, "Exit codes"): 0 ok, 1 data errors (or no usable image),
2 usage or config errors — as ``flower-client --check``. No Flower import.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import ConfigError
from common.data import FORMATS, canonical_format
from common.exclusion import Exclusion
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
    parser.add_argument("--data", type=Path, help="the site's data folder (or a manifest CSV); "
                        "overrides the site YAML's data.path")
    parser.add_argument("--format", default=None, type=_format_arg,
                        help=f"layout: auto (detect) or one of {', '.join(FORMATS)}")
    parser.add_argument("--config", type=Path, help="site YAML: its data section (path, format, exclude)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="list invalid files as skipped instead of failing (training uses the rest)")
    return parser


def data_settings(args: argparse.Namespace) -> tuple[Path, str, tuple[Exclusion, ...], bool]:
    """(data path, format, exclusions, skip_invalid) from the site YAML and the command line;
    ConfigError when neither names the data."""
    path, fmt, exclude, skip = args.data, args.format, (), args.skip_invalid
    if args.config is not None:
        from client.site_config import load_site_config

        cfg = load_site_config(args.config, {"data.path": str(args.data) if args.data else None,
                                             "data.format": args.format})
        if cfg.data.path is None:
            raise ConfigError(f"{args.config}: data.path is not set (a synthetic site has nothing to check)")
        path, fmt, exclude = Path(cfg.data.path), cfg.data.format, cfg.data.exclude
        skip = skip or cfg.data.skip_invalid
    if path is None:
        raise ConfigError("give --data PATH or --config site.yaml")
    return path, fmt or "auto", exclude, skip


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage message
        return 0 if exc.code in (0, None) else 2
    try:
        path, fmt, exclude, skip = data_settings(args)
    except (ConfigError, ValueError) as exc:  # ValueError: an empty data.exclude entry
        print(f"fedbus-site-check: {exc}", file=sys.stderr)
        return 2
    if not path.exists():
        print(f"fedbus-site-check: {path}: no such file or folder", file=sys.stderr)
        return 2
    try:
        report = check_site(path, fmt, exclude=exclude, skip_invalid=skip)
    except (DataError, ValueError) as exc:
        print(f"fedbus-site-check: {exc}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

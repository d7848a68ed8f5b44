"""``flower-client``: run one hospital's SuperNode.

    flower-client --site udiat --config site.yaml          # check the data, then join
    flower-client --site udiat --config site.yaml --check  # only check the data

The site's data is checked first (``common.data.check.check_site``); invalid data prints the
report and nothing starts. Then the SuperNode starts with the site's node_config, TLS and node
authentication on (``--insecure`` only by explicit choice). With ``tuning.fast`` (default) our
launcher runs the SuperNode with shortened polls next to one long-lived ClientApp worker
(client/supernode.py); ``--stock`` runs the unmodified ``flower-supernode``. Everything is
supervised here: SIGINT/SIGTERM stop both cleanly; if the SuperNode exits, so do we (systemd
restarts us); a crashed worker is restarted a bounded number of times.

``--skip-invalid`` (or ``data.skip_invalid`` in the site YAML) trains on the valid cases and lists
the invalid files it left out, in the site check and in the site log; ``data.exclude`` leaves
named cases out with a reason. The default stays strict: any invalid file stops the site.

Exit status (deploy/README.md, "Exit codes"): 0 stopped on request, the run ended (``after_run:
exit``) or the check passed, 1 the data check failed or the SuperNode/worker failed, 2 usage or
config error (also an unreadable data path or layout).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from client.site_config import SiteConfig, load_site_config, site_config_from_dict
from client.site_process import Site
from common.config import ConfigError
from launch.audit import process_identity


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flower-client", description="Run a hospital's SuperNode.")
    p.add_argument("--site", required=True, help="site name (must match the registered name)")
    p.add_argument("--config", type=Path, default=os.environ.get("FEDBUS_SITE_CONFIG"),
                   help="site YAML (default: $FEDBUS_SITE_CONFIG)")
    p.add_argument("--check", action="store_true", help="only check the site's data and exit")
    p.add_argument("--data", help="data folder or manifest (overrides data.path)")
    p.add_argument("--format", help="data format (overrides data.format)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="train on the valid cases, listing the invalid files left out (default: strict)")
    p.add_argument("--superlink", help="coordinator Fleet API host:port")
    p.add_argument("--ca-cert", help="federation CA certificate")
    p.add_argument("--key", help="this site's private key (OpenSSH EC)")
    p.add_argument("--state-dir", help="site state folder (logs, audit, FedBN state)")
    p.add_argument("--runtime-port", type=int, help="local Runtime API port (unique per host)")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext, no node authentication (loopback trials only)")
    p.add_argument("--stock", action="store_true", help="stock SuperNode timing (no warm worker)")
    p.add_argument("--quiet", action="store_true", help="do not echo the SuperNode log")
    return p


def resolve_config(args: argparse.Namespace) -> SiteConfig:
    """The site's config: the YAML (if any) with the command line's overrides. ``--site`` is
    never an override: a YAML naming another site is an error, not a rename."""
    overrides: dict[str, Any] = {
        "data.path": args.data, "data.format": args.format,
        "superlink": args.superlink, "ca_cert": args.ca_cert, "private_key": args.key,
        "state_dir": args.state_dir, "runtime_port": args.runtime_port,
        "insecure": True if args.insecure else None, "tuning.fast": False if args.stock else None,
        "data.skip_invalid": True if args.skip_invalid else None,
    }
    if args.config is not None:
        cfg = load_site_config(args.config, overrides)
        if cfg.site != args.site:
            raise ConfigError(f"{args.config} configures site {cfg.site!r} but --site says "
                              f"{args.site!r}; use the YAML of site {args.site!r} or fix --site")
    else:  # everything from the command line
        data: dict[str, Any] = {"site": args.site}
        for key, value in overrides.items():
            head, _, rest = key.partition(".")
            if value is None:
                continue
            if rest:
                data.setdefault(head, {})[rest] = value
            else:
                data[key] = value
        cfg = site_config_from_dict(data, "command line")
    return cfg


def check_data(cfg: SiteConfig) -> tuple[int, dict[str, Any]]:
    """Run the site check and print its report; returns (exit status: 0 ok, 1 data errors, 2 a
    missing or unrecognisable data path; summary for the audit log)."""
    if cfg.data.synthetic_centre is not None:
        print(f"site {cfg.site}: synthetic data ({cfg.data.synthetic_n} cases like "
              f"{cfg.data.synthetic_centre}); data check skipped")
        return 0, {"synthetic": cfg.data.synthetic_centre, "n": cfg.data.synthetic_n}
    from common.data.check import check_site
    from common.records import DataError

    assert cfg.data.path is not None
    if not Path(cfg.data.path).exists():
        print(f"site {cfg.site}: data path {cfg.data.path} does not exist", file=sys.stderr)
        return 2, {"error": "data path missing"}
    try:
        report = check_site(cfg.data.path, cfg.data.format, exclude=cfg.data.exclude,
                            skip_invalid=cfg.data.skip_invalid)
    except (DataError, ValueError) as exc:
        print(f"site {cfg.site}: cannot read the data: {exc}", file=sys.stderr)
        return 2, {"error": type(exc).__name__}
    print(report.format())
    summary = {"format": report.fmt, "cases": report.per_class, "errors": len(report.errors),
               "warnings": len(report.warnings), "excluded": len(report.excluded),
               "annotations": report.annotations}
    if cfg.data.skip_invalid:
        summary["skipped_invalid"] = len(report.errors)
    return (0 if report.ok else 1), summary


def _key_permissions_ok(path: str) -> bool:
    mode = Path(path).stat().st_mode
    if mode & 0o077:
        print(f"warning: private key {path} is readable by others (mode {oct(mode & 0o777)}); "
              "chmod 600 it", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as exc:
        print(f"flower-client: {exc}", file=sys.stderr)
        return 2
    status, summary = check_data(cfg)
    if args.check or status:
        if status:
            print(f"site {cfg.site}: data check failed; not starting", file=sys.stderr)
        return status
    if cfg.insecure:
        print("WARNING: --insecure: plaintext and no node authentication; loopback trials only",
              file=sys.stderr)
    elif cfg.private_key is not None:
        _key_permissions_ok(cfg.private_key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    site = Site(cfg, echo=not args.quiet)
    stop: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop.append(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        version = metadata.version("fedbus")
    except metadata.PackageNotFoundError:
        version = "unknown"
    site.audit.append("site_start", site=cfg.site, superlink=cfg.superlink, tls=not cfg.insecure,
                      fast=cfg.tuning.fast, version=version, data=summary, **process_identity())
    code = 1
    try:
        site.start()
        code = site.supervise(stop)
    finally:
        site.stop()
        site.audit.append("site_stop", site=cfg.site, reason=stop[0] if stop else
                          ("run ended" if code == 0 else "supernode exit"),
                          code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())

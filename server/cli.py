"""``flower-server``: start the SuperLink and run one federated experiment on it.

    flower-server --config experiment.yaml --deploy coordinator.yaml [--resume]

``--config`` is the experiment (a RunSpec YAML: strategy, rounds, local epochs, quorum, round
deadline, run folder); ``--deploy`` the coordinator's deployment settings (CoordinatorConfig:
address, TLS files, state folder, sites' public keys). The SuperLink runs with TLS and node
authentication unless ``--insecure`` (refused on a non-loopback ``--host`` without
``--allow-insecure-network``). Sites listed in the deployment file are registered (once;
re-registering is skipped by key fingerprint). The run is submitted with ``flwr run`` and
followed until it ends; the ServerApp itself bounds every wait (quorum give-up, round timeout),
and we add an overall deadline. ``--resume`` continues from the run folder's checkpoint.

Exit status: 0 run completed, 1 failed, 2 configuration error, 3 stopped early (no quorum or
on request; the checkpoint is intact: rerun with --resume).
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from common.config import ConfigError
from common.federation import load_run_spec
from server.coordinator_config import load_coordinator_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flower-server", description="Run a federated experiment.")
    p.add_argument("--config", type=Path, required=True, help="experiment (RunSpec) YAML")
    p.add_argument("--deploy", type=Path, help="coordinator deployment YAML (CoordinatorConfig)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--state-dir", help="coordinator state folder (overrides state_dir)")
    p.add_argument("--host", help="bind address of the SuperLink (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="SuperLink port (Fleet, Control and Runtime APIs)")
    p.add_argument("--app-dir", help="Flower app directory to submit")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext, no node authentication (loopback hosts only)")
    p.add_argument("--allow-insecure-network", action="store_true",
                   help="with --insecure: also on a non-loopback --host (exposes the SuperLink)")
    p.add_argument("--stock", action="store_true", help="stock ServerApp timing (SuperExec)")
    p.add_argument("--register-only", action="store_true",
                   help="start the SuperLink, register the configured sites, stop")
    p.add_argument("--quiet", action="store_true", help="do not echo the ServerApp log")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = load_run_spec(args.config)
        cfg = load_coordinator_config(args.deploy, {
            "state_dir": args.state_dir, "host": args.host, "port": args.port,
            "app_dir": args.app_dir, "insecure": True if args.insecure else None,
            "allow_insecure_network": True if args.allow_insecure_network else None,
            "fast": False if args.stock else None})
    except ConfigError as exc:
        print(f"flower-server: {exc}", file=sys.stderr)
        return 2
    from server.coordinator import Coordinator  # flwr imports only after the config is valid

    coordinator = Coordinator(cfg, spec, Path(args.config).resolve(), echo=not args.quiet)
    stop: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop.append(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return coordinator.main(resume=args.resume, register_only=args.register_only, stop=stop)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""``fedbus-pki`` (launch/pki.py) from a checkout, for scripts and docs: python deploy/pki.py ..."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when not installed
from launch.pki import *  # noqa: E402,F403  (make_ca, make_site_key, ... for callers that load this file)
from launch.pki import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""``python tests/servers/up/run_up.py ARGS``: ``netstack ARGS`` with the dashboard
stand-in installed when the real dashboard module is missing (see standin.py)."""

import os
import sys

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
)

from tests.servers.up import standin

standin.install()

from netstack.cli import main  # noqa: E402

raise SystemExit(main())

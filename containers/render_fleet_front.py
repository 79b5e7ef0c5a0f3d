"""Render containers/fleet-front.conf, the nginx config of docker-compose.yml's
fleet-front service, with simulation.credentials.fleet_front_config.

    python containers/render_fleet_front.py      # from the repository root

tests/test_compose.py checks that the committed file is what this renders.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "containers" / "fleet-front.conf"


def render() -> str:
    sys.path.insert(0, str(REPO))
    from simulation.credentials import fleet_front_config

    # Paths inside the fleet-front container (docker-compose.yml mounts them); the
    # SuperLink is the compose service "superlink", its one port 8000.
    return fleet_front_config(listen="0.0.0.0:9092", upstream="superlink:8000",
                              certfile="/certs/server.pem", keyfile="/certs/server.key",
                              upstream_ca_certfile="/certs/ca.crt", upstream_server_name="superlink",
                              state_dir="/tmp")


if __name__ == "__main__":
    CONFIG.write_text(render())
    print(f"wrote {CONFIG}")

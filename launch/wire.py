"""Names both ends of a message agree on, so that client/ and server/ need not import each other.

SecAgg+ mode (client/secagg_app.py, server/secagg_app.py): the server puts these keys in each
round's fit config and the sites read them.
"""
from __future__ import annotations

#: Per-array factors the sites multiply their update by (a JSON list of floats, one per array).
KEY_SCALES = "update-scales"
#: SecAgg+'s quantisation range [-r, r]: scaled update values outside it are clipped.
KEY_RANGE = "secagg-clipping-range"
#: Most training images a site may have; a larger site refuses the round (its weight would overflow).
KEY_MAX_WEIGHT = "secagg-max-weight"
#: Strategies a masked sum supports (a weighted mean; FedProx adds its term at the sites).
SECAGG_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")

"""flowray: minute-by-minute web-traffic analytics on Ray.

The public surface is small on purpose: the settings, the stable site routing and the
HTTP client. Everything else is internal and may change.
"""

from flowray.config import Settings
from flowray.core.router import ShardMap, normalize_site, shard_for_site

__all__ = ["Settings", "ShardMap", "normalize_site", "shard_for_site", "__version__"]

__version__ = "0.1.0"

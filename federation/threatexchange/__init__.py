"""hashfed as a python-threatexchange extension (``pip install 'hashfed[threatexchange]'``).

Load it into the pytx CLI with ``threatexchange config extensions add
federation.threatexchange``; HMA lists :data:`TX_MANIFEST`'s classes in its
``OMM_CONFIG``. See docs/integrations.md.
"""

from threatexchange.extensions.manifest import ThreatExchangeExtensionManifest

from .exchange import HashfedCollabConfig, HashfedCredentials, HashfedExchange, HashfedFetchError
from .signal_types import OWN_SIGNAL_TYPES, Md5Signal, PhotoDnaSignal, Sha1Signal, Sha256Signal

TX_MANIFEST = ThreatExchangeExtensionManifest(signal_types=OWN_SIGNAL_TYPES, apis=(HashfedExchange,))

__all__ = [
    "OWN_SIGNAL_TYPES",
    "TX_MANIFEST",
    "HashfedCollabConfig",
    "HashfedCredentials",
    "HashfedExchange",
    "HashfedFetchError",
    "Md5Signal",
    "PhotoDnaSignal",
    "Sha1Signal",
    "Sha256Signal",
]

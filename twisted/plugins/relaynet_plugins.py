# Imported by twistd and by every program that looks up endpoint plugins:
# keep it tiny.  relaynet.endpoints imports only Twisted and zope.
from twisted.application.service import ServiceMaker

from relaynet.endpoints import RelayClientParser, RelayServerParser

relaynet = ServiceMaker(
    "relaynet",
    "relaynet.tap",
    "Run a relay that speaks the Azure Relay Hybrid Connections protocol.",
    "relaynet",
)
relayServer, relayClient = RelayServerParser(), RelayClientParser()

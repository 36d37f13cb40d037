# Imported by twistd and by every program that looks up endpoint plugins:
# keep it tiny.
from twisted.application.service import ServiceMaker

relaynet = ServiceMaker(
    "relaynet",
    "relaynet.tap",
    "Run a relay that speaks the Azure Relay Hybrid Connections protocol.",
    "relaynet",
)

"""
Echo through a relaynet relay with plain autobahn WebSockets: a listener
that accepts every sender and sends back what it gets, and a sender that
checks the echo.

    python doc/examples/echo.py 'Endpoint=sb://127.0.0.1:9090/;SharedAccessKeyName=...;SharedAccessKey=...' echo

The relaynet client library (relay: endpoints, listener and sender classes)
does all of this for you; this file shows the protocol underneath.
"""

import json
import sys
import time
from urllib.parse import quote

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import react

from relaynet.auth import mintToken


def parseConnectionString(text):
    fields = dict(part.split("=", 1) for part in text.split(";") if part)
    hostPort = fields["Endpoint"].split("://", 1)[1].strip("/")
    return hostPort, fields["SharedAccessKeyName"], fields["SharedAccessKey"]


class Echo(WebSocketClientProtocol):
    """
    The listener's side of one relayed connection.
    """

    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


class Control(WebSocketClientProtocol):
    """
    The listener's control channel: accept every sender at its rendezvous.
    """

    def onOpen(self):
        self.factory.ready.callback(None)

    def onMessage(self, payload, isBinary):
        command = json.loads(payload)
        if "accept" in command:
            address = command["accept"]["address"]
            factory = WebSocketClientFactory(address)
            factory.protocol = Echo
            connectWS(factory)


class Sender(WebSocketClientProtocol):
    def onOpen(self):
        self.sendMessage(b"hello through the relay", isBinary=True)

    def onMessage(self, payload, isBinary):
        self.factory.echoed.callback(payload)
        self.sendClose(1000)


async def main(reactor, connectionString, entity):
    hostPort, keyName, key = parseConnectionString(connectionString)
    token = quote(mintToken(f"http://{hostPort}/{entity}", keyName, key, int(time.time()) + 3600), safe="")
    base = f"ws://{hostPort}/$hc/{entity}"

    control = WebSocketClientFactory(f"{base}?sb-hc-action=listen&sb-hc-token={token}")
    control.protocol = Control
    control.ready = Deferred()
    connectWS(control)
    await control.ready
    print("listener is up")

    sender = WebSocketClientFactory(f"{base}?sb-hc-action=connect&sb-hc-token={token}")
    sender.protocol = Sender
    sender.echoed = Deferred()
    connectWS(sender)
    echoed = await sender.echoed.addTimeout(30, reactor)
    print("echoed:", echoed.decode())


if __name__ == "__main__":
    react(lambda reactor, *args: ensureDeferred(main(reactor, *args)), sys.argv[1:])

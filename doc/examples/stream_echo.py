"""
A stream listener and a sender with relaynet's client library: the
listener echoes every message, the sender checks one.

    python doc/examples/stream_echo.py 'Endpoint=sb://127.0.0.1:9090/;SharedAccessKeyName=...;SharedAccessKey=...' echo
"""

import sys

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory
from twisted.internet.task import react

from relaynet.listener import HybridListener
from relaynet.streams import MessageProtocol, connectStream
from relaynet.tokens import fromKey


class Echo(MessageProtocol):
    """
    The listener's side: every message goes back as it came, text or binary.
    """

    def messageReceived(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


class Ask(MessageProtocol):
    """
    The sender's side: one question, and the answer.
    """

    def connectionMade(self):
        self.answer = Deferred()
        self.sendMessage("hello through the relay".encode(), isBinary=False)

    def messageReceived(self, payload, isBinary):
        self.answer.callback(payload.decode())


def onlyFriends(request):
    """
    Look at each sender before taking it: accept, or reject with a status.
    """
    if request.getHeader("X-Friend") != "yes":
        return 403, "Friends only"
    return True


def parseConnectionString(text):
    fields = dict(part.split("=", 1) for part in text.split(";") if part)
    hostPort = fields["Endpoint"].split("://", 1)[1].strip("/")
    return hostPort, fields["SharedAccessKeyName"], fields["SharedAccessKey"]


async def main(reactor, connectionString, entity):
    hostPort, keyName, key = parseConnectionString(connectionString)
    relay = f"ws://{hostPort}"
    tokens = fromKey(keyName, key, reactor)

    listener = HybridListener(
        reactor, relay, entity, tokens,
        streamFactory=Factory.forProtocol(Echo),
        acceptHandler=onlyFriends,
        onStatus=lambda status: print("listener is", status),
    )
    await listener.listen()

    sender = await connectStream(reactor, relay, entity, tokens, Factory.forProtocol(Ask), headers={"X-Friend": "yes"})
    print("answer:", await sender.answer)
    sender.transport.loseConnection()
    await listener.close()


if __name__ == "__main__":
    react(lambda reactor, *args: ensureDeferred(main(reactor, *args)), sys.argv[1:])

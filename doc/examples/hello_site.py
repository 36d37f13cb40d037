"""
Serve a twisted.web site on this machine through a relaynet relay.

    python hello_site.py 'Endpoint=sb://127.0.0.1:9090/;SharedAccessKeyName=...;SharedAccessKey=...' web
"""

import sys

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import react
from twisted.web.resource import Resource
from twisted.web.static import Data

from relaynet.tokens import fromKey
from relaynet.web import WebListener


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        sender = request.getClientAddress().host
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"hello {sender}, you asked for {request.uri.decode()}\n".encode()

    def render_POST(self, request):
        return b"got %d bytes\n" % len(request.content.read())


def parseConnectionString(text):
    fields = dict(part.split("=", 1) for part in text.split(";") if part)
    hostPort = fields["Endpoint"].split("://", 1)[1].strip("/")
    return hostPort, fields["SharedAccessKeyName"], fields["SharedAccessKey"]


async def main(reactor, connectionString, entity):
    hostPort, keyName, key = parseConnectionString(connectionString)
    root = Resource()
    root.putChild(b"", Data(b"the front page\n", "text/plain"))
    root.putChild(b"hello", Hello())
    tokens = fromKey(keyName, key, reactor)
    web = WebListener(reactor, f"ws://{hostPort}", entity, tokens, root)
    await web.listen()
    reactor.addSystemEventTrigger("before", "shutdown", web.close)
    print(f"serving http://{hostPort}/{entity}/ through the relay; Ctrl-C stops", flush=True)
    await Deferred()  # until Ctrl-C


if __name__ == "__main__":
    react(lambda reactor, *args: ensureDeferred(main(reactor, *args)), sys.argv[1:])

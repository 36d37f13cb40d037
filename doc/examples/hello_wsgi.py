"""
Serve a WSGI application on this machine through a relaynet relay.

    python hello_wsgi.py 'Endpoint=sb://127.0.0.1:9090/;SharedAccessKeyName=...;SharedAccessKey=...' app
"""

import sys

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import react
from twisted.web.wsgi import WSGIResource

from relaynet.tokens import fromKey
from relaynet.web import WebListener


def application(environ, start_response):
    size = int(environ.get("CONTENT_LENGTH") or 0)
    received = environ["wsgi.input"].read(size)
    text = (
        f"{environ['REQUEST_METHOD']} SCRIPT_NAME={environ['SCRIPT_NAME']} "
        f"PATH_INFO={environ['PATH_INFO']} QUERY_STRING={environ['QUERY_STRING']} "
        f"from {environ['REMOTE_ADDR']}, {len(received)} bytes in\n"
    ).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(text)))])
    return [text]


def parseConnectionString(text):
    fields = dict(part.split("=", 1) for part in text.split(";") if part)
    hostPort = fields["Endpoint"].split("://", 1)[1].strip("/")
    return hostPort, fields["SharedAccessKeyName"], fields["SharedAccessKey"]


async def main(reactor, connectionString, entity):
    hostPort, keyName, key = parseConnectionString(connectionString)
    resource = WSGIResource(reactor, reactor.getThreadPool(), application)
    tokens = fromKey(keyName, key, reactor)
    web = WebListener(reactor, f"ws://{hostPort}", entity, tokens, resource)
    await web.listen()
    reactor.addSystemEventTrigger("before", "shutdown", web.close)
    print(f"serving http://{hostPort}/{entity}/ through the relay; Ctrl-C stops", flush=True)
    await Deferred()


if __name__ == "__main__":
    react(lambda reactor, *args: ensureDeferred(main(reactor, *args)), sys.argv[1:])

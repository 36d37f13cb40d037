#!/usr/bin/env node
'use strict';
// Echo listener built on the unmodified hyco-ws 1.0.5 createRelayedServer.
// See README.md for the output lines and exit codes.

const hyco = require('hyco-ws');
const c = require('./common');

const USAGE = `usage: node hyco_ws_listener.js --relay ws://127.0.0.1:PORT --entity NAME --key-name K --key KEY
         [--mode echo | --mode close-after N | --mode drop-after N]
         [--token-override STRING] [--expect-fail] [--no-deflate]
         [--max-listen-errors N] [--retry-delay SECONDS] [--verbose]
         [--deadline SECONDS] [--dry-run]

  --mode echo            echo every message back with the same type (default)
  --mode close-after N   echo; once N connections were accepted and have all closed,
                         exit without closing the control channel (listener vanishes)
  --mode drop-after N    echo; exit at once when the N-th connection is accepted
  --token-override S     send S verbatim as the ServiceBusAuthorization token
  --expect-fail          the listen upgrade must be refused: print REFUSED <status>, exit 0
  --no-deflate           perMessageDeflate:false (default is hyco-ws's true)
  --max-listen-errors N  consecutive control-channel failures tolerated (default 5)
  --retry-delay S        wait before reconnecting after a failure (default 1)
  --verbose              log control-channel messages to stderr
  --deadline S           exit by itself after S seconds (default 60)
  --dry-run              print URL and TOKEN lines and exit 0`;

function parseMode(value, rest) {
  // Accepts "echo", "close-after N", "close-after=N", "close-after:N" (same for drop-after).
  const m = /^(echo|close-after|drop-after)(?:[:=](\d+))?$/.exec(value);
  if (!m) return { error: 'unknown mode ' + JSON.stringify(value) };
  const mode = m[1];
  if (mode === 'echo') {
    if (m[2] !== undefined) return { error: 'echo takes no count' };
    return { value: { mode, count: null }, consumed: 0 };
  }
  if (m[2] !== undefined) return { value: { mode, count: parseInt(m[2], 10) }, consumed: 0 };
  if (rest.length && /^\d+$/.test(rest[0])) {
    return { value: { mode, count: parseInt(rest[0], 10) }, consumed: 1 };
  }
  return { error: mode + ' needs a count N' };
}

const opts = c.parseArgs(process.argv.slice(2), {
  relay: { type: 'string', required: true },
  entity: { type: 'string', required: true },
  'key-name': { type: 'string' },
  key: { type: 'string' },
  mode: { type: 'custom', parse: parseMode, default: { mode: 'echo', count: null } },
  'token-override': { type: 'string' },
  'expect-fail': { type: 'flag' },
  'no-deflate': { type: 'flag' },
  'max-listen-errors': { type: 'int', default: 5 },
  'retry-delay': { type: 'number', default: 1 },
  verbose: { type: 'flag' },
  deadline: { type: 'number', default: 60 },
  'dry-run': { type: 'flag' },
}, USAGE);

if (opts.tokenOverride === undefined && (opts.keyName === undefined || opts.key === undefined)) {
  c.usageError(USAGE, '--key-name and --key are required unless --token-override is given');
}
if (opts.mode.count !== null && opts.mode.count < 1) c.usageError(USAGE, '--mode count must be >= 1');

const relay = c.parseRelay(opts.relay, USAGE);
const listenUrl = c.swapUrl(hyco.createRelayListenUri(relay.hostname, opts.entity), relay, 'ws');
const token = opts.tokenOverride !== undefined
  ? opts.tokenOverride
  : c.makeToken(hyco, listenUrl, opts.keyName, opts.key);

if (opts.dryRun) {
  c.out('URL ' + listenUrl);
  c.out('TOKEN ' + token);
  c.exit(c.EXIT_OK);
  return;
}

// ---------------------------------------------------------------------------
let server = null; // current hyco-ws RelayedServer
let everReady = false;
let consecutiveListenErrors = 0;
let acceptedCount = 0; // rendezvous sockets that opened
let openConnections = 0;
let acceptFailures = 0;
let modeReached = false;

function stop(reason, code) {
  if (c.isExiting()) return;
  c.out('STOPPED ' + reason);
  c.exit(code);
}

function finalCode() {
  return acceptFailures > 0 ? c.EXIT_FAIL : c.EXIT_OK;
}

c.startDeadline(opts.deadline, () => {
  if (opts.expectFail) {
    stop('deadline', everReady ? c.EXIT_FAIL : c.EXIT_DEADLINE);
  } else if (opts.mode.mode !== 'echo') {
    stop('deadline', c.EXIT_DEADLINE); // never reached N
  } else {
    stop('deadline', everReady ? finalCode() : c.EXIT_DEADLINE);
  }
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    c.log('got ' + sig);
    stop('signal', everReady || opts.expectFail ? finalCode() : c.EXIT_FAIL);
  });
}

// hyco-ws throws from inside ws event handlers (e.g. JSON.parse of a non-JSON control
// message, reject paths that use undefined variables). Report and fail.
process.on('uncaughtException', (err) => {
  c.log('uncaught exception:', err);
  c.out('CRASH ' + JSON.stringify(c.errorText(err)));
  c.exit(c.EXIT_FAIL);
});

function startServer() {
  if (c.isExiting()) return;
  c.log('connecting control channel to ' + listenUrl);
  const srv = hyco.createRelayedServer({
    server: listenUrl,
    token, // a string: hyco-ws sends it once, never renews it
    perMessageDeflate: !opts.noDeflate,
  }, (ws) => onConnection(ws));
  server = srv;

  // 'listening' is emitted from the control websocket's onopen, i.e. after the relay's 101.
  srv.on('listening', () => {
    everReady = true;
    consecutiveListenErrors = 0;
    if (opts.expectFail) {
      c.log('control channel connected although --expect-fail was given');
      c.out('READY');
      stop('connected', c.EXIT_FAIL);
      return;
    }
    c.out('READY');
    const cc = srv.controlChannel;
    cc.on('close', (code, reason) => {
      if (srv !== server || c.isExiting()) return;
      c.out('DISCONNECTED ' + code);
      c.log('control channel closed: ' + code + ' ' + JSON.stringify(reason || ''));
    });
    if (opts.verbose) {
      cc.on('message', (data) => c.log('control message: ' + data));
    }
  });

  // The control websocket's onerror re-emits its error here, then hyco-ws reconnects at once
  // from onerror AND again from onclose (two parallel reconnects per failure, no back-off).
  // Setting closeRequested inside this handler (which runs first) suppresses both; we
  // reconnect ourselves with a delay instead.
  srv.on('error', (err) => {
    srv.closeRequested = true;
    if (srv !== server || c.isExiting()) return;
    const status = c.statusFromError(err);
    const what = status !== null ? String(status) : (err && err.code) || 'ERROR';
    c.log('control channel error: ' + c.errorText(err));
    if (opts.expectFail) {
      if (status !== null) {
        c.out('REFUSED ' + status);
        stop('refused', c.EXIT_OK);
      } else {
        c.out('LISTEN_ERROR ' + what);
        stop('error', c.EXIT_FAIL);
      }
      return;
    }
    c.out('LISTEN_ERROR ' + what);
    consecutiveListenErrors += 1;
    if (consecutiveListenErrors > opts.maxListenErrors) {
      c.out('LISTEN_FAILED ' + what);
      stop('listen-failed', c.EXIT_FAIL);
      return;
    }
    try {
      if (srv.controlChannel) srv.controlChannel.terminate();
    } catch (_) { /* already gone */ }
    setTimeout(startServer, opts.retryDelay * 1000);
  });

  srv.on('close', () => c.log('relayed server closed'));
}

// `ws` is hyco-ws's rendezvous WebSocket (ws 1.1.x client), still CONNECTING here.
function onConnection(ws) {
  let opened = false;
  let myIndex = null;
  c.log('accept received, rendezvous to ' + ws.url);

  ws.on('open', () => {
    opened = true;
    acceptedCount += 1;
    openConnections += 1;
    myIndex = acceptedCount;
    c.out('ACCEPTED ' + myIndex);
    if (opts.mode.mode === 'drop-after' && acceptedCount >= opts.mode.count) {
      modeReached = true;
      stop('drop-after', finalCode());
      return;
    }
    if (opts.mode.mode === 'close-after' && acceptedCount >= opts.mode.count) {
      modeReached = true;
    }
  });

  // ws 1.x: text arrives as a string, binary as a Buffer with flags.binary === true.
  ws.on('message', (data, flags) => {
    const binary = !!(flags && flags.binary);
    ws.send(data, { binary }, (err) => {
      if (err) c.log('echo send failed on connection ' + myIndex + ': ' + c.errorText(err));
    });
  });

  ws.on('error', (err) => {
    if (!opened) {
      acceptFailures += 1;
      const status = c.statusFromError(err);
      c.out('ACCEPT_FAILED ' + (status !== null ? status : (err && err.code) || 'ERROR'));
      c.log('rendezvous failed: ' + c.errorText(err));
    } else {
      c.log('connection ' + myIndex + ' error: ' + c.errorText(err));
    }
  });

  ws.on('close', (code) => {
    if (!opened) return;
    openConnections -= 1;
    c.out('CLOSED ' + myIndex + ' ' + code);
    if (opts.mode.mode === 'close-after' && modeReached && openConnections === 0) {
      // Exit without a WebSocket close on the control channel: the relay sees the TCP
      // connection go away, as with a crashed listener.
      stop('close-after', finalCode());
    }
  });
}

startServer();

#!/usr/bin/env node
'use strict';
// Sender built on the unmodified hyco-ws 1.0.5 relayedConnect; checks the echo of an
// echo listener byte for byte. See README.md for the output lines and exit codes.

const crypto = require('crypto');
const hyco = require('hyco-ws');
const c = require('./common');

const USAGE = `usage: node hyco_ws_sender.js --relay ws://127.0.0.1:PORT --entity NAME --key-name K --key KEY
         [--sizes 1,100,65536,1048576] [--text] [--connections C]
         [--token-override STRING | --no-token] [--token-in-query]
         [--expect-fail] [--expect-status N] [--close-timeout SECONDS]
         [--deadline SECONDS] [--dry-run]

  --sizes LIST        message sizes in bytes, sent in this order on every connection
  --text              send random printable ASCII as text messages (default: random binary)
  --connections C     concurrent connections (default 1)
  --token-override S  send S verbatim as the ServiceBusAuthorization token
  --no-token          send no token at all (anonymous sender)
  --token-in-query    pass the token as sb-hc-token in the URL instead of the header
  --expect-fail       every connection must be refused: print REFUSED <status> for each
  --expect-status N   with --expect-fail: the status must be N
  --close-timeout S   time allowed for the closing handshake after the echoes (default 10)
  --deadline S        exit by itself after S seconds (default 60)
  --dry-run           print URL and TOKEN lines and exit 0`;

function parseSizes(value) {
  if (!/^\d+(,\d+)*$/.test(value)) return { error: 'needs a comma-separated list of byte counts' };
  return { value: value.split(',').map((s) => parseInt(s, 10)), consumed: 0 };
}

const opts = c.parseArgs(process.argv.slice(2), {
  relay: { type: 'string', required: true },
  entity: { type: 'string', required: true },
  'key-name': { type: 'string' },
  key: { type: 'string' },
  sizes: { type: 'custom', parse: parseSizes, default: [1, 100, 65536, 1048576] },
  text: { type: 'flag' },
  connections: { type: 'int', default: 1 },
  'token-override': { type: 'string' },
  'no-token': { type: 'flag' },
  'token-in-query': { type: 'flag' },
  'expect-fail': { type: 'flag' },
  'expect-status': { type: 'int' },
  'close-timeout': { type: 'number', default: 10 },
  deadline: { type: 'number', default: 60 },
  'dry-run': { type: 'flag' },
}, USAGE);

if (opts.noToken && opts.tokenOverride !== undefined) {
  c.usageError(USAGE, '--no-token and --token-override exclude each other');
}
if (!opts.noToken && opts.tokenOverride === undefined && (opts.keyName === undefined || opts.key === undefined)) {
  c.usageError(USAGE, '--key-name and --key are required unless --token-override or --no-token is given');
}
if (opts.connections < 1) c.usageError(USAGE, '--connections must be >= 1');
if (opts.expectStatus !== undefined && !opts.expectFail) c.usageError(USAGE, '--expect-status needs --expect-fail');

const relay = c.parseRelay(opts.relay, USAGE);
const baseSendUrl = c.swapUrl(hyco.createRelaySendUri(relay.hostname, opts.entity), relay, 'ws');
let token = null;
if (opts.tokenOverride !== undefined) token = opts.tokenOverride;
else if (!opts.noToken) token = c.makeToken(hyco, baseSendUrl, opts.keyName, opts.key);

let sendUrl = baseSendUrl;
let headerToken = token;
if (opts.tokenInQuery && token !== null) {
  // Same helper, with the token argument: appends &sb-hc-token=<encodeURIComponent(token)>.
  sendUrl = c.swapUrl(hyco.createRelaySendUri(relay.hostname, opts.entity, token), relay, 'ws');
  headerToken = null;
}

if (opts.dryRun) {
  c.out('URL ' + sendUrl);
  c.out('TOKEN ' + (token === null ? '' : token));
  c.exit(c.EXIT_OK);
  return;
}

// ---------------------------------------------------------------------------
const PRINTABLE = Buffer.from(Array.from({ length: 0x7f - 0x20 }, (_, i) => 0x20 + i));

function randomPayload(size) {
  const bytes = crypto.randomBytes(size);
  if (!opts.text) return bytes;
  for (let i = 0; i < size; i += 1) bytes[i] = PRINTABLE[bytes[i] % PRINTABLE.length];
  return bytes.toString('latin1');
}

const results = new Array(opts.connections).fill(null);
let finished = 0;

function report(i, result) {
  if (results[i] !== null) return;
  results[i] = result;
  finished += 1;
  if (opts.expectFail && result.refused) c.out('REFUSED ' + result.status);
  c.out(JSON.stringify(Object.assign({ conn: i }, result)));
  if (finished === opts.connections) summarize(false);
}

function summarize(deadline) {
  const ok = results.filter((r) => r && r.ok).length;
  const failed = opts.connections - ok;
  c.out('DONE ok=' + ok + ' failed=' + failed);
  if (deadline) {
    c.exit(c.EXIT_DEADLINE);
  } else {
    c.exit(failed === 0 ? c.EXIT_OK : c.EXIT_FAIL);
  }
}

c.startDeadline(opts.deadline, () => {
  for (let i = 0; i < opts.connections; i += 1) {
    if (results[i] === null) {
      results[i] = { ok: false, error: 'deadline reached' };
      c.out(JSON.stringify({ conn: i, ok: false, error: 'deadline reached' }));
    }
  }
  summarize(true);
});

function runConnection(i) {
  const started = Date.now();
  let messages = 0;
  let bytes = 0;
  let opened = false;
  let phase = 'connecting';
  let expected = null; // payload awaiting its echo
  let closeTimer = null;

  c.log('conn ' + i + ': connecting to ' + sendUrl);
  const ws = hyco.relayedConnect(sendUrl, headerToken);

  function fail(error, extra) {
    clearTimeout(closeTimer);
    report(i, Object.assign({ ok: false, messages, bytes, error, ms: Date.now() - started }, extra || {}));
    try {
      if (opened) ws.terminate();
    } catch (_) { /* ignore */ }
  }

  // ws 1.x: with a listener here, a non-101 answer is handed over instead of becoming
  // an 'error' ("unexpected server response (NNN)"); we also get the reason phrase.
  ws.on('unexpected-response', (req, res) => {
    const status = res.statusCode;
    const reason = res.statusMessage || '';
    c.log('conn ' + i + ': upgrade refused: ' + status + ' ' + JSON.stringify(reason));
    res.resume();
    req.abort();
    phase = 'refused';
    if (opts.expectFail) {
      const statusOk = opts.expectStatus === undefined || opts.expectStatus === status;
      report(i, {
        ok: statusOk,
        refused: true,
        status,
        reason,
        error: statusOk ? undefined : 'expected status ' + opts.expectStatus,
      });
    } else {
      fail('upgrade refused', { refused: true, status, reason });
    }
  });

  ws.on('open', () => {
    opened = true;
    phase = 'open';
    c.log('conn ' + i + ': open after ' + (Date.now() - started) + ' ms' +
      (ws.protocol ? ', subprotocol ' + ws.protocol : ''));
    if (opts.expectFail) {
      fail('connected although --expect-fail was given', { refused: false });
      return;
    }
    sendNext();
  });

  function sendNext() {
    if (messages === opts.sizes.length) {
      closeCleanly();
      return;
    }
    expected = randomPayload(opts.sizes[messages]);
    ws.send(expected, { binary: !opts.text }, (err) => {
      if (err) fail('send failed: ' + c.errorText(err));
    });
  }

  ws.on('message', (data, flags) => {
    if (phase !== 'open' || expected === null) {
      fail('unexpected message in phase ' + phase);
      return;
    }
    const isBinary = !!(flags && flags.binary);
    const size = opts.sizes[messages];
    if (opts.text) {
      if (isBinary || typeof data !== 'string') {
        fail('message ' + messages + ': sent text, echo came back binary');
        return;
      }
      if (data !== expected) {
        fail('message ' + messages + ': text echo differs (sent ' + size + ' chars, got ' + data.length + ')');
        return;
      }
    } else {
      if (!isBinary || !Buffer.isBuffer(data)) {
        fail('message ' + messages + ': sent binary, echo came back as text');
        return;
      }
      if (!data.equals(expected)) {
        fail('message ' + messages + ': binary echo differs (sent ' + size + ' bytes, got ' + data.length + ')');
        return;
      }
    }
    expected = null;
    messages += 1;
    bytes += size;
    sendNext();
  });

  function closeCleanly() {
    phase = 'closing';
    closeTimer = setTimeout(() => {
      fail('closing handshake not finished within ' + opts.closeTimeout + ' s');
    }, opts.closeTimeout * 1000);
    ws.close(1000, 'done');
  }

  ws.on('close', (code, reason) => {
    clearTimeout(closeTimer);
    if (phase === 'closing') {
      report(i, { ok: true, messages, bytes, closeCode: code, ms: Date.now() - started });
    } else if (phase === 'open') {
      fail('closed by peer (' + code + (reason ? ' ' + reason : '') + ') after ' + messages + ' messages',
        { closeCode: code });
    } else if (phase === 'connecting') {
      // An 'error' has normally been reported already; this is the fallback.
      fail('connection closed before the upgrade completed');
    }
  });

  ws.on('error', (err) => {
    const text = c.errorText(err);
    c.log('conn ' + i + ': error: ' + text);
    const status = c.statusFromError(err);
    if (status !== null && opts.expectFail && phase === 'connecting') {
      // Fallback if 'unexpected-response' was not used by this ws version.
      report(i, { ok: opts.expectStatus === undefined || opts.expectStatus === status, refused: true, status });
      return;
    }
    fail(phase === 'connecting' ? 'connect failed: ' + text : 'error: ' + text,
      status !== null ? { refused: true, status } : undefined);
  });
}

process.on('uncaughtException', (err) => {
  c.log('uncaught exception:', err);
  c.out('CRASH ' + JSON.stringify(c.errorText(err)));
  c.exit(c.EXIT_FAIL);
});

for (let i = 0; i < opts.connections; i += 1) runConnection(i);

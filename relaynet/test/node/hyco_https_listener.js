#!/usr/bin/env node
'use strict';
// HTTP listener built on the unmodified hyco-https 1.4.5 createRelayedServer, with either a
// plain request handler or an Express 4 app mounted on the relayed server.
// See README.md for the routes, the output lines and the exit codes.

const crypto = require('crypto');
const https = require('hyco-https');
const c = require('./common');

const USAGE = `usage: node hyco_https_listener.js --relay ws://127.0.0.1:PORT --entity NAME --key-name K --key KEY
         [--app plain|express] [--pin-request] [--token-override STRING]
         [--max-listen-errors N] [--retry-delay SECONDS] [--verbose]
         [--deadline SECONDS] [--dry-run]

  --app plain|express    plain (req, res) handler (default) or an Express app with the
                         same routes, mounted on the relayed server
  --pin-request          copy hyco-https's handleBody/destroy onto each request before it
                         reaches the app (works around Express replacing the request's
                         prototype; see README.md). Off by default.
  --token-override S     send S verbatim as the ServiceBusAuthorization token
  --max-listen-errors N  consecutive control-channel failures tolerated (default 5)
  --retry-delay S        wait before reconnecting after a failure (default 1)
  --verbose              log control-channel messages to stderr
  --deadline S           exit by itself after S seconds (default 60)
  --dry-run              print URL and TOKEN lines and exit 0

Routes under /NAME (any method unless said otherwise):
  /echo           the request body back, in 3 res.write() calls, application/octet-stream
  /bytes/N        N bytes, byte i = i % 251, written in 16 KiB res.write() calls
  /status/CODE    status CODE with a short text body (no body for 1xx, 204 and 304)
  /slow/MS        "late" after MS milliseconds
  /headers        "ok" with X-Number set to the number 5 and two Set-Cookie values
  anything else   GET/HEAD/POST/PUT/DELETE/PATCH: 200 JSON
                  {"method","url","headers","bodyLength","bodySha256"}; other methods: 405`;

function parseApp(value) {
  if (value !== 'plain' && value !== 'express') return { error: 'must be plain or express' };
  return { value, consumed: 0 };
}

const opts = c.parseArgs(process.argv.slice(2), {
  relay: { type: 'string', required: true },
  entity: { type: 'string', required: true },
  'key-name': { type: 'string' },
  key: { type: 'string' },
  app: { type: 'custom', parse: parseApp, default: 'plain' },
  'pin-request': { type: 'flag' },
  'token-override': { type: 'string' },
  'max-listen-errors': { type: 'int', default: 5 },
  'retry-delay': { type: 'number', default: 1 },
  verbose: { type: 'flag' },
  deadline: { type: 'number', default: 60 },
  'dry-run': { type: 'flag' },
}, USAGE);

if (opts.tokenOverride === undefined && (opts.keyName === undefined || opts.key === undefined)) {
  c.usageError(USAGE, '--key-name and --key are required unless --token-override is given');
}
if (opts.entity === '' || opts.entity.startsWith('/')) c.usageError(USAGE, '--entity must be a name without a leading /');

const relay = c.parseRelay(opts.relay, USAGE);
const listenUrl = c.swapUrl(https.createRelayListenUri(relay.hostname, opts.entity), relay, 'ws');
const token = opts.tokenOverride !== undefined
  ? opts.tokenOverride
  : c.makeToken(https, listenUrl, opts.keyName, opts.key);

if (opts.dryRun) {
  c.out('URL ' + listenUrl);
  c.out('TOKEN ' + token);
  c.exit(c.EXIT_OK);
  return;
}

// hyco-https reports some failures with console.log (send acknowledgements, caught
// exceptions). Keep stdout for the machine-readable lines.
console.log = (...args) => c.log('hyco-https console.log:', ...args);

// ---------------------------------------------------------------------------
// Shared route handlers. `reply` hides the one difference between the two apps: the plain app
// sets statusCode/Content-Type and calls res.end(body), the Express app uses res.status().send().

const JSON_METHODS = new Set(['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'PATCH']);
const CHUNK = 16 * 1024;
const PATTERN = Buffer.alloc(CHUNK + 251);
for (let i = 0; i < PATTERN.length; i += 1) PATTERN[i] = i % 251;

// Bytes [offset, offset + len) of the deterministic stream (byte i = i % 251), as a fresh copy
// (ws may mask client frames in place).
function patternBytes(offset, len) {
  const start = offset % 251;
  return Buffer.from(PATTERN.subarray(start, start + len));
}

// Reads the whole request body from the request stream. hyco-https pushes the body message in
// one piece and then ends the stream (or ends it at once when the request has no body).
function readBody(req, done) {
  const chunks = [];
  let finished = false;
  req.on('data', (chunk) => chunks.push(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk)));
  req.on('end', () => {
    if (finished) return;
    finished = true;
    done(null, Buffer.concat(chunks));
  });
  req.on('error', (err) => {
    c.log('request stream error (' + req.method + ' ' + req.url + '): ' + c.errorText(err));
    if (finished) return;
    finished = true;
    done(err);
  });
}

function sha256(buf) {
  return crypto.createHash('sha256').update(buf).digest('hex');
}

function makeRoutes(reply) {
  function withBody(req, res, next) {
    readBody(req, (err, body) => {
      if (err) {
        reply(res, 500, 'text/plain', 'request body error: ' + c.errorText(err) + '\n');
        return;
      }
      try {
        next(body);
      } catch (e) {
        c.log('handler failed for ' + req.method + ' ' + req.url + ':', e);
        try {
          reply(res, 500, 'text/plain', 'handler error: ' + c.errorText(e) + '\n');
        } catch (_) { /* response already broken */ }
      }
    });
  }

  return {
    // Any path under the entity: describe the request.
    inspect(req, res, url) {
      if (!JSON_METHODS.has(req.method)) {
        withBody(req, res, () => {
          res.setHeader('Allow', Array.from(JSON_METHODS).join(', '));
          reply(res, 405, 'text/plain', 'method not allowed\n');
        });
        return;
      }
      withBody(req, res, (body) => {
        const info = {
          method: req.method,
          url,
          headers: req.headers,
          bodyLength: body.length,
          bodySha256: sha256(body),
        };
        reply(res, 200, 'application/json', JSON.stringify(info));
      });
    },

    // The request body back, in three res.write() calls.
    echo(req, res) {
      withBody(req, res, (body) => {
        res.statusCode = 200;
        res.setHeader('Content-Type', 'application/octet-stream');
        const a = Math.floor(body.length / 3);
        const b = Math.floor((2 * body.length) / 3);
        res.write(body.subarray(0, a));
        res.write(body.subarray(a, b));
        res.write(body.subarray(b));
        res.end();
      });
    },

    // N deterministic bytes in 16 KiB writes, one write per turn of the event loop so that a
    // large response really streams (hyco-https opens the rendezvous once > 64 KiB is buffered).
    bytes(req, res, nText) {
      withBody(req, res, () => {
        const n = Number(nText);
        if (!Number.isSafeInteger(n)) {
          reply(res, 400, 'text/plain', 'bad byte count\n');
          return;
        }
        res.statusCode = 200;
        res.setHeader('Content-Type', 'application/octet-stream');
        let sent = 0;
        const step = () => {
          if (sent >= n) {
            res.end();
            return;
          }
          const len = Math.min(CHUNK, n - sent);
          res.write(patternBytes(sent, len));
          sent += len;
          setImmediate(step);
        };
        step();
      });
    },

    status(req, res, codeText) {
      withBody(req, res, () => {
        const code = Number(codeText);
        if (!Number.isInteger(code) || code < 100 || code > 999) {
          reply(res, 400, 'text/plain', 'status must be 100..999\n');
          return;
        }
        if (code < 200 || code === 204 || code === 304) {
          // hyco-https drops the whole response (not only the body) if a body is passed to
          // end() for these codes, so send none.
          res.statusCode = code;
          res.end();
          return;
        }
        reply(res, code, 'text/plain', 'status ' + code + '\n');
      });
    },

    slow(req, res, msText) {
      withBody(req, res, () => {
        const ms = Number(msText);
        setTimeout(() => reply(res, 200, 'text/plain', 'late'), ms);
      });
    },

    headers(req, res) {
      withBody(req, res, () => {
        res.setHeader('X-Number', 5);
        res.setHeader('Set-Cookie', ['a=1; Path=/', 'b=2; Path=/']);
        reply(res, 200, 'text/plain', 'ok');
      });
    },

    notFound(req, res, url) {
      withBody(req, res, () => {
        reply(res, 404, 'application/json', JSON.stringify({ error: 'not under entity ' + opts.entity, url }));
      });
    },
  };
}

// Match "/ENTITY" followed by "/", "?" or the end; case-insensitive like the relay's entity names.
const entityRe = new RegExp('^/' + opts.entity.replace(/[.*+?^${}()|[\]\\]/g, '\\$&') + '(?=[/?]|$)', 'i');

function buildPlainApp() {
  const routes = makeRoutes((res, status, type, body) => {
    res.statusCode = status;
    res.setHeader('Content-Type', type);
    res.end(body);
  });
  return (req, res) => {
    const url = req.url || '';
    const m = entityRe.exec(url);
    if (!m) {
      routes.notFound(req, res, url);
      return;
    }
    const rest = url.slice(m[0].length);
    const q = rest.indexOf('?');
    const suffix = q === -1 ? rest : rest.slice(0, q);
    let p;
    if (/^\/echo\/?$/.test(suffix)) routes.echo(req, res);
    else if ((p = /^\/bytes\/(\d+)\/?$/.exec(suffix))) routes.bytes(req, res, p[1]);
    else if ((p = /^\/status\/(\d+)\/?$/.exec(suffix))) routes.status(req, res, p[1]);
    else if ((p = /^\/slow\/(\d+)\/?$/.exec(suffix))) routes.slow(req, res, p[1]);
    else if (/^\/headers\/?$/.test(suffix)) routes.headers(req, res);
    else routes.inspect(req, res, url);
  };
}

function buildExpressApp() {
  // As the hyco-https README says: before Express is loaded, make Node's http.ServerResponse
  // the relayed one, so that Express's response prototype inherits from it.
  const http = require('http');
  http.ServerResponse = https.ServerResponse;
  const express = require('express');

  const routes = makeRoutes((res, status, type, body) => {
    res.status(status).type(type).send(body);
  });
  const app = express();
  const router = express.Router();
  router.all('/echo', (req, res) => routes.echo(req, res));
  router.all('/bytes/:n(\\d+)', (req, res) => routes.bytes(req, res, req.params.n));
  router.all('/status/:code(\\d+)', (req, res) => routes.status(req, res, req.params.code));
  router.all('/slow/:ms(\\d+)', (req, res) => routes.slow(req, res, req.params.ms));
  router.all('/headers', (req, res) => routes.headers(req, res));
  router.use((req, res) => routes.inspect(req, res, req.originalUrl));
  app.use(entityRe, router);
  app.use((req, res) => routes.notFound(req, res, req.originalUrl));
  app.use((err, req, res, next) => { // eslint-disable-line no-unused-vars
    c.log('express error for ' + req.method + ' ' + req.originalUrl + ':', err);
    res.status(500).type('text/plain').send('express error: ' + c.errorText(err) + '\n');
  });
  return app;
}

const app = opts.app === 'express' ? buildExpressApp() : buildPlainApp();

// ---------------------------------------------------------------------------
let server = null;
let everReady = false;
let crashed = false;
let consecutiveListenErrors = 0;
let requestCount = 0;

function stop(reason, code) {
  if (c.isExiting()) return;
  c.out('STOPPED ' + reason);
  c.exit(code);
}

c.startDeadline(opts.deadline, () => {
  stop('deadline', everReady ? c.EXIT_OK : c.EXIT_DEADLINE);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    c.log('got ' + sig + ' after ' + requestCount + ' requests');
    stop('signal', everReady && !crashed ? c.EXIT_OK : c.EXIT_FAIL);
  });
}

// hyco-https throws from inside ws event handlers (non-JSON control message, `accept`
// messages, an 'error' on the rendezvous it opens for a large response, ...). Report and fail.
process.on('uncaughtException', (err) => {
  crashed = true;
  c.log('uncaught exception:', err);
  c.out('CRASH ' + JSON.stringify(c.errorText(err)));
  stop('crash', c.EXIT_FAIL);
});

// Copy the hyco-https IncomingMessage methods that hyco-https itself calls later onto the
// request, so that they survive Express's Object.setPrototypeOf(req, app.request). hyco-https
// does the same for requests that arrive on a rendezvous socket, but not on the control channel.
function pinRequest(req) {
  req.handleBody = req.handleBody; // eslint-disable-line no-self-assign
  req.destroy = req.destroy; // eslint-disable-line no-self-assign
}

function onRequest(req, res) {
  requestCount += 1;
  c.out('REQUEST ' + req.method + ' ' + req.url);
  if (opts.verbose) c.log('request headers: ' + JSON.stringify(req.headers));
  if (opts.pinRequest) pinRequest(req);
  app(req, res);
}

function errorOf(event) {
  // ws 6 hands an ErrorEvent ({ error, message }) to onerror; hyco-https re-emits that.
  return event && event.error ? event.error : event;
}

function startServer() {
  if (c.isExiting()) return;
  c.log('connecting control channel to ' + listenUrl + ' (app ' + opts.app + ')');
  const srv = https.createRelayedServer({
    server: listenUrl,
    token, // a string: hyco-https sends it once and never renews it
  });
  server = srv;
  srv.on('request', onRequest);

  // 'listening' is emitted from the control websocket's onopen (the relay's 101). The callback
  // of server.listen() is never called by hyco-https.
  srv.on('listening', () => {
    everReady = true;
    consecutiveListenErrors = 0;
    c.out('READY');
    const cc = srv.controlChannel;
    cc.on('close', (code, reason) => {
      if (srv !== server || c.isExiting()) return;
      c.out('DISCONNECTED ' + code);
      c.log('control channel closed: ' + code + ' ' + JSON.stringify(reason || ''));
    });
    if (opts.verbose) {
      cc.on('message', (data) => {
        if (typeof data === 'string') c.log('control message (text): ' + data);
        else c.log('control message (binary): ' + data.length + ' bytes');
      });
    }
  });

  // hyco-https 1.4.5 emits 'error' only when a handler exists, then reconnects from onerror
  // and once more from onclose (with a 0/1/2/5/10/30 s back-off). Setting closeRequested in
  // this handler, which runs before the library's checks, stops both; we reconnect ourselves.
  srv.on('error', (event) => {
    const err = errorOf(event);
    srv.closeRequested = true;
    if (srv !== server || c.isExiting()) return;
    const status = c.statusFromError(err);
    const what = status !== null ? String(status) : (err && err.code) || 'ERROR';
    c.log('control channel error: ' + c.errorText(err));
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
    setTimeout(() => {
      if (srv !== server || c.isExiting()) return;
      srv.closeRequested = false;
      srv.listen();
    }, opts.retryDelay * 1000);
  });

  srv.on('close', () => c.log('relayed server closed'));
  srv.listen();
}

startServer();

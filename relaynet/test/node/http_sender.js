#!/usr/bin/env node
'use strict';
// Plain Node http client for the relay's HTTP side: sends requests to
// http://host:port/ENTITY[/suffix][?query] and reports every response.
// See README.md for the output lines and exit codes.

const crypto = require('crypto');
const fs = require('fs');
const http = require('http');
const https = require('https');
const hyco = require('hyco-https'); // only for its URL and token helpers
const c = require('./common');

const USAGE = `usage: node http_sender.js --url http://127.0.0.1:PORT/ENTITY[/suffix][?query]
         [--method M] [--body-size N | --body-file F] [--chunked]
         [--header 'Name: value']... [--key-name K --key KEY [--entity NAME]]
         [--concurrency C] [--count N] [--no-keep-alive]
         [--deadline SECONDS] [--dry-run]

  --url U             request URL (http:// or https://)
  --method M          request method (default GET, or POST when a body option is given)
  --body-size N       send N bytes, byte i = i % 251
  --body-file F       send the contents of file F
  --chunked           no Content-Length: Transfer-Encoding: chunked, body written in 16 KiB
                      chunks (an empty chunked body if no body option is given)
  --header 'N: V'     add a request header (repeatable; the same name twice sends two lines)
  --key-name K --key KEY
                      add ServiceBusAuthorization: a token made with createRelayToken over
                      http://host:port/ENTITY
  --entity NAME       the ENTITY of the token scope (default: first path segment of --url)
  --concurrency C     requests in flight at once (default 1)
  --count N           requests in total (default 1)
  --no-keep-alive     a new TCP connection per request (default: Node's keep-alive agent)
  --deadline S        exit by itself after S seconds (default 60)
  --dry-run           print URL and TOKEN lines and exit 0`;

const opts = c.parseArgs(process.argv.slice(2), {
  url: { type: 'string', required: true },
  method: { type: 'string' },
  'body-size': { type: 'int' },
  'body-file': { type: 'string' },
  chunked: { type: 'flag' },
  header: { type: 'list' },
  'key-name': { type: 'string' },
  key: { type: 'string' },
  entity: { type: 'string' },
  concurrency: { type: 'int', default: 1 },
  count: { type: 'int', default: 1 },
  'no-keep-alive': { type: 'flag' },
  deadline: { type: 'number', default: 60 },
  'dry-run': { type: 'flag' },
}, USAGE);

let target;
try {
  target = new URL(opts.url);
} catch (_) {
  c.usageError(USAGE, '--url is not a URL: ' + JSON.stringify(opts.url));
}
if (target.protocol !== 'http:' && target.protocol !== 'https:') c.usageError(USAGE, '--url must be http:// or https://');
if (target.username || target.password || target.hash) c.usageError(USAGE, '--url must not have credentials or a fragment');
if (opts.bodySize !== undefined && opts.bodyFile !== undefined) c.usageError(USAGE, '--body-size and --body-file exclude each other');
if (opts.bodySize !== undefined && opts.bodySize < 0) c.usageError(USAGE, '--body-size must be >= 0');
if ((opts.keyName === undefined) !== (opts.key === undefined)) c.usageError(USAGE, '--key-name and --key go together');
if (opts.entity !== undefined && opts.keyName === undefined) c.usageError(USAGE, '--entity is only used with --key-name/--key');
if (opts.concurrency < 1) c.usageError(USAGE, '--concurrency must be >= 1');
if (opts.count < 0) c.usageError(USAGE, '--count must be >= 0');
if (opts.method !== undefined && !/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(opts.method)) c.usageError(USAGE, '--method is not an HTTP token');

// --header 'Name: value' -> [[name, value], ...] in order.
const extraHeaders = opts.header.map((h) => {
  const colon = h.indexOf(':');
  if (colon <= 0) c.usageError(USAGE, '--header needs "Name: value", got ' + JSON.stringify(h));
  return [h.slice(0, colon).trim(), h.slice(colon + 1).trim()];
});

const hasBodyOption = opts.bodySize !== undefined || opts.bodyFile !== undefined || opts.chunked;
const method = (opts.method || (hasBodyOption ? 'POST' : 'GET'));

let token = null;
if (opts.keyName !== undefined) {
  // Token scope http://host:port/ENTITY, built like the other scripts: library helper with the
  // relay's hostname, then scheme and host:port swapped, then createRelayToken.
  const entity = opts.entity !== undefined ? opts.entity : target.pathname.split('/')[1];
  if (!entity) c.usageError(USAGE, 'no ENTITY in --url; give --entity');
  const relay = c.parseRelay(target.protocol + '//' + target.host, USAGE);
  const scopeUrl = c.swapUrl(hyco.createRelayHttpsUri(relay.hostname, entity), relay, 'http');
  token = c.makeToken(hyco, scopeUrl, opts.keyName, opts.key);
}

if (opts.dryRun) {
  c.out('URL ' + target.toString());
  c.out('TOKEN ' + (token === null ? '' : token));
  c.exit(c.EXIT_OK);
  return;
}

// ---------------------------------------------------------------------------
let body = null;
if (opts.bodyFile !== undefined) {
  try {
    body = fs.readFileSync(opts.bodyFile);
  } catch (err) {
    c.usageError(USAGE, '--body-file: ' + c.errorText(err));
  }
} else if (opts.bodySize !== undefined) {
  body = Buffer.alloc(opts.bodySize);
  for (let i = 0; i < body.length; i += 1) body[i] = i % 251;
}

const CHUNK = 16 * 1024;
const transport = target.protocol === 'https:' ? https : http;
const agent = opts.noKeepAlive ? false : undefined; // undefined: the global (keep-alive) agent

function buildHeaders() {
  // Header name -> value or array of values, first spelling wins.
  const headers = {};
  const spelling = {};
  const add = (name, value) => {
    const lower = name.toLowerCase();
    const key = spelling[lower] || (spelling[lower] = name);
    if (headers[key] === undefined) headers[key] = value;
    else headers[key] = [].concat(headers[key], value);
  };
  const userHasAuth = extraHeaders.some(([n]) => n.toLowerCase() === 'servicebusauthorization');
  if (token !== null && !userHasAuth) add('ServiceBusAuthorization', token);
  for (const [n, v] of extraHeaders) add(n, v);
  const userHasFraming = extraHeaders.some(([n]) => /^(content-length|transfer-encoding)$/i.test(n));
  if (!userHasFraming) {
    if (opts.chunked) add('Transfer-Encoding', 'chunked');
    else if (body !== null) add('Content-Length', String(body.length));
  }
  return headers;
}

let okCount = 0;
let otherCount = 0;
let errorCount = 0;
let started = 0;
let finished = 0;
const inFlight = new Set();

function summarize() {
  c.out('DONE ok=' + okCount + ' other=' + otherCount);
}

c.startDeadline(opts.deadline, () => {
  const unfinished = opts.count - finished;
  for (let i = 0; i < unfinished; i += 1) {
    c.out(JSON.stringify({ error: 'deadline reached' }));
  }
  otherCount += unfinished;
  summarize();
  for (const req of inFlight) req.destroy();
  c.exit(c.EXIT_DEADLINE);
});

process.on('uncaughtException', (err) => {
  c.log('uncaught exception:', err);
  c.out('CRASH ' + JSON.stringify(c.errorText(err)));
  c.exit(c.EXIT_FAIL);
});

function finishOne(line) {
  if (c.isExiting()) return;
  finished += 1;
  c.out(JSON.stringify(line));
  if (finished === opts.count) {
    summarize();
    c.exit(errorCount > 0 ? c.EXIT_FAIL : c.EXIT_OK);
    return;
  }
  startNext();
}

function sendOne() {
  const index = started;
  started += 1;
  const t0 = Date.now();
  let done = false;
  const req = transport.request(target, { method, headers: buildHeaders(), agent });
  inFlight.add(req);

  req.on('response', (res) => {
    const hash = crypto.createHash('sha256');
    let length = 0;
    res.on('data', (chunk) => {
      hash.update(chunk);
      length += chunk.length;
    });
    res.on('end', () => {
      if (done) return;
      done = true;
      inFlight.delete(req);
      if (res.statusCode >= 200 && res.statusCode <= 299) okCount += 1;
      else otherCount += 1;
      finishOne({
        status: res.statusCode,
        reason: res.statusMessage,
        headers: res.headers,
        bodyLength: length,
        bodySha256: hash.digest('hex'),
        ms: Date.now() - t0,
      });
    });
    res.on('error', (err) => fail(err));
  });

  function fail(err) {
    if (done) return;
    done = true;
    inFlight.delete(req);
    errorCount += 1;
    otherCount += 1;
    c.log('request ' + index + ' failed: ' + c.errorText(err));
    finishOne({ error: c.errorText(err), ms: Date.now() - t0 });
  }
  req.on('error', fail);

  if (body === null) {
    req.end();
  } else if (!opts.chunked) {
    req.end(body);
  } else {
    // Several writes, so that the relay sees a body of unknown length arriving in pieces.
    let offset = 0;
    const step = () => {
      if (done) return;
      if (offset >= body.length) {
        req.end();
        return;
      }
      const piece = body.subarray(offset, offset + CHUNK);
      offset += piece.length;
      if (req.write(piece)) setImmediate(step);
      else req.once('drain', step);
    };
    step();
  }
}

function startNext() {
  while (started < opts.count && started - finished < opts.concurrency) sendOne();
}

c.log(method + ' ' + target.toString() + ' x' + opts.count + ' (concurrency ' + opts.concurrency + ')');
if (opts.count === 0) {
  summarize();
  c.exit(c.EXIT_OK);
} else {
  startNext();
}

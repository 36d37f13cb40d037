'use strict';
// Shared helpers for the hyco-* interop scripts: argument parsing, URL/host swapping,
// token creation, machine-readable output and a process-wide deadline.
//
// Conventions for every script:
//   stdout: machine-readable lines only (see README.md)
//   stderr: diagnostics
//   exit:   0 success, 1 test failure, 2 usage error, 3 deadline reached

const EXIT_OK = 0;
const EXIT_FAIL = 1;
const EXIT_USAGE = 2;
const EXIT_DEADLINE = 3;

let exiting = false;

function out(line) {
  process.stdout.write(line + '\n');
}

function log(...parts) {
  const text = parts.map((p) => (typeof p === 'string' ? p : inspectShort(p))).join(' ');
  process.stderr.write('[' + new Date().toISOString() + '] ' + text + '\n');
}

function inspectShort(value) {
  if (value instanceof Error) return value.stack || String(value);
  try {
    return JSON.stringify(value);
  } catch (_) {
    return String(value);
  }
}

// Exit once stdout and stderr have been flushed. Later calls are ignored.
function exit(code) {
  if (exiting) return;
  exiting = true;
  let pending = 2;
  const done = () => {
    pending -= 1;
    if (pending === 0) process.exit(code);
  };
  process.stdout.write('', done);
  process.stderr.write('', done);
  // Never hang on a stuck pipe.
  setTimeout(() => process.exit(code), 2000).unref();
}

function isExiting() {
  return exiting;
}

function usageError(usage, message) {
  process.stderr.write('error: ' + message + '\n\n' + usage + '\n');
  process.exit(EXIT_USAGE);
}

// spec: { 'option-name': { type: 'string' | 'int' | 'number' | 'flag' | 'list' | 'custom', default } }
// 'list' options may be repeated; their value is the array of all values given (default: []).
// Returns an object keyed by camelCased option names. Unknown options are usage errors.
function parseArgs(argv, spec, usage) {
  const result = {};
  const listsSeen = new Set();
  for (const [name, def] of Object.entries(spec)) {
    let initial = def.default;
    if (initial === undefined && def.type === 'flag') initial = false;
    if (initial === undefined && def.type === 'list') initial = [];
    result[camel(name)] = initial;
  }
  for (let i = 0; i < argv.length; i += 1) {
    let arg = argv[i];
    if (arg === '-h' || arg === '--help') {
      process.stdout.write(usage + '\n');
      process.exit(EXIT_OK);
    }
    if (!arg.startsWith('--')) usageError(usage, 'unexpected argument: ' + arg);
    let inlineValue;
    const eq = arg.indexOf('=');
    if (eq !== -1) {
      inlineValue = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    const name = arg.slice(2);
    const def = spec[name];
    if (!def) usageError(usage, 'unknown option: ' + arg);
    if (def.type === 'flag') {
      if (inlineValue !== undefined) usageError(usage, arg + ' takes no value');
      result[camel(name)] = true;
      continue;
    }
    let value = inlineValue;
    if (value === undefined) {
      i += 1;
      if (i >= argv.length) usageError(usage, arg + ' needs a value');
      value = argv[i];
    }
    if (def.type === 'int') {
      if (!/^-?\d+$/.test(value)) usageError(usage, arg + ' needs an integer, got ' + JSON.stringify(value));
      value = parseInt(value, 10);
    } else if (def.type === 'number') {
      const n = Number(value);
      if (value === '' || !Number.isFinite(n)) usageError(usage, arg + ' needs a number, got ' + JSON.stringify(value));
      value = n;
    } else if (def.type === 'list') {
      // Repeatable option: the first occurrence replaces the default, later ones append.
      value = listsSeen.has(name) ? result[camel(name)].concat([value]) : [value];
      listsSeen.add(name);
    } else if (def.type === 'custom') {
      // def.parse(value, nextArgs) -> { value, consumed }
      const parsed = def.parse(value, argv.slice(i + 1));
      if (parsed.error) usageError(usage, arg + ': ' + parsed.error);
      i += parsed.consumed || 0;
      value = parsed.value;
    }
    result[camel(name)] = value;
  }
  for (const [name, def] of Object.entries(spec)) {
    if (def.required && result[camel(name)] === undefined) usageError(usage, '--' + name + ' is required');
  }
  return result;
}

function camel(name) {
  return name.replace(/-([a-z])/g, (_, c) => c.toUpperCase());
}

// --relay ws://127.0.0.1:PORT (also accepts wss://, http://, https://; a path is not allowed)
function parseRelay(text, usage) {
  let u;
  try {
    u = new URL(text);
  } catch (_) {
    usageError(usage, '--relay is not a URL: ' + JSON.stringify(text));
  }
  const secure = u.protocol === 'wss:' || u.protocol === 'https:';
  if (!['ws:', 'wss:', 'http:', 'https:'].includes(u.protocol)) {
    usageError(usage, '--relay must use ws://, wss://, http:// or https://');
  }
  if (u.pathname !== '/' || u.search || u.hash || u.username || u.password) {
    usageError(usage, '--relay must be scheme://host:port only, got ' + JSON.stringify(text));
  }
  return {
    wsProtocol: secure ? 'wss:' : 'ws:',
    httpProtocol: secure ? 'https:' : 'http:',
    hostname: u.hostname, // '[::1]' keeps its brackets
    host: u.host, // hostname[:port], default port omitted
  };
}

// The hyco-* helpers hard-code wss://{namespace}:443 (or https://{namespace}). Swap in the
// relay's scheme and host:port. `kind` is 'ws' for WebSocket URLs, 'http' for HTTP ones.
function swapUrl(libraryUrl, relay, kind) {
  const u = new URL(libraryUrl);
  u.protocol = kind === 'http' ? relay.httpProtocol : relay.wsProtocol;
  u.host = relay.host;
  return u.toString();
}

// Token over the swapped URL with an http:// scheme, so that its resource
// (http://host:port/entity) matches the Host header the relay sees.
function makeToken(hyco, swappedUrl, keyName, key, ttlSeconds) {
  const u = new URL(swappedUrl);
  u.protocol = 'http:';
  return hyco.createRelayToken(u.toString(), keyName, key, ttlSeconds);
}

// Starts the process-wide deadline. onDeadline() runs once; it should print its summary
// and call exit(); if it does not, the process exits with EXIT_DEADLINE shortly after.
function startDeadline(seconds, onDeadline) {
  const timer = setTimeout(() => {
    log('deadline of ' + seconds + ' s reached');
    try {
      if (onDeadline) onDeadline();
    } finally {
      exit(EXIT_DEADLINE);
    }
  }, Math.max(0, seconds * 1000));
  return timer;
}

// "unexpected server response (401)" (ws 1.1.x) or "Unexpected server response: 401" (ws 6.x,
// used by hyco-https) -> 401.
function statusFromError(err) {
  const text = err && (err.message || String(err));
  const m = /unexpected server response(?: \((\d{3})\)|: (\d{3}))/i.exec(text || '');
  return m ? parseInt(m[1] || m[2], 10) : null;
}

function errorText(err) {
  if (!err) return 'unknown error';
  if (typeof err === 'string') return err;
  return err.code ? err.code + ' ' + (err.message || '') : (err.message || String(err));
}

module.exports = {
  EXIT_OK,
  EXIT_FAIL,
  EXIT_USAGE,
  EXIT_DEADLINE,
  out,
  log,
  exit,
  isExiting,
  usageError,
  parseArgs,
  parseRelay,
  swapUrl,
  makeToken,
  startDeadline,
  statusFromError,
  errorText,
};

'use strict';
// Never loaded by require('http'): Node's built-in module wins over node_modules.
// Present only so that hyco-ws's dependency "http": "latest" can be satisfied.
module.exports = require('node:http');

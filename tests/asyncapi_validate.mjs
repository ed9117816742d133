// Parse an AsyncAPI document with the official @asyncapi/parser and print its
// diagnostics as JSON: [{severity, code, message, path, line}].
// Usage: node asyncapi_validate.mjs <npm prefix holding @asyncapi/parser> <document>
// The parser lives in the tests' npm cache (tests/node_tools.py), not next to
// this script, so it is loaded with a require() rooted at that prefix.
import { createRequire } from 'node:module';
import { resolve } from 'node:path';

const [prefix, document] = process.argv.slice(2);
const { Parser, fromFile } = createRequire(resolve(prefix, 'package.json'))('@asyncapi/parser');
const SEVERITY = ['error', 'warning', 'info', 'hint']; // DiagnosticSeverity 0..3

const { diagnostics } = await fromFile(new Parser(), document).parse();
console.log(JSON.stringify(diagnostics.map((d) => ({
  severity: SEVERITY[d.severity] ?? String(d.severity),
  code: d.code,
  message: d.message,
  path: d.path.join('/'),
  line: d.range ? d.range.start.line + 1 : null,
}))));

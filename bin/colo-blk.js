#!/usr/bin/env node
// Entry point for `npx colo-blk`: the TypeScript is compiled to dist/ by the
// `prepare` script, which npm runs on `npm install` / `npm ci` in a clone.
import '../dist/src/cli/main.js';

// The command line of a developers' tool (node:util parseArgs), with what an
// operator expects of any command: `--help` / `-h` prints the usage and exits
// 0; an unknown option or a missing value says which, prints the usage and
// exits 2 (parseArgs alone throws, and Node prints a stack trace).
import { parseArgs } from 'node:util';

/** The options' values (parseArgs `values`), or the process exits as said above. */
export function toolArgs(name, usage, options) {
  let values;
  try {
    ({ values } = parseArgs({
      options: { ...options, help: { type: 'boolean', short: 'h', default: false } },
    }));
  } catch (err) {
    process.stderr.write(`${name}: ${err.message}\n\n${usage}\n`);
    process.exit(2);
  }
  if (values.help) {
    process.stdout.write(`${usage}\n`);
    process.exit(0);
  }
  return values;
}

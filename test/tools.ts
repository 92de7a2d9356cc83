// Suites that need programs beyond Node (qemu-img, nbdinfo, nbdkit, fio, ip
// netns …). On a machine without them the suite is skipped, its name says
// which tools and how to install them, and tools/run-tests.mjs lists every
// skip in its summary. Under COLO_BLK_REQUIRE_TOOLS=1 (set by .ci/run) a
// missing tool is a failing test instead: CI must run everything.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'vitest';

/** The Debian package of each tool. */
const PACKAGES: Record<string, string> = {
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  'qemu-nbd': 'qemu-utils',
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
  nbdkit: 'nbdkit',
  'nbd-server': 'nbd-server',
  fio: 'fio',
  ip: 'iproute2',
  openssl: 'openssl',
  'c++': 'g++',
  'qemu-system-x86_64': 'qemu-system-x86',
  busybox: 'busybox-static',
  cpio: 'cpio',
  'mkfs.ext4': 'e2fsprogs',
};

/**
 * What a test needs: programs on PATH, 'netns' (network namespaces: root and ip), or
 * 'tmpfs' (mounting a small tmpfs of its own: root and mount).
 */
export type Need = keyof typeof PACKAGES | 'netns' | 'tmpfs';

const required = process.env.COLO_BLK_REQUIRE_TOOLS === '1';
const SKIPS_DIR = path.resolve('.tool-skips');

function onPath(tool: string): boolean {
  return (process.env.PATH ?? '').split(path.delimiter).some((dir) => {
    try {
      fs.accessSync(path.join(dir, tool), fs.constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

let netnsOk: boolean | null = null;
/** Whether this process can make a network namespace (tried once: add, then delete). */
function netnsUsable(): boolean {
  if (netnsOk !== null) return netnsOk;
  if (!onPath('ip')) return (netnsOk = false);
  const name = `cbt-probe-${process.pid}`;
  const add = spawnSync('ip', ['netns', 'add', name], { stdio: 'ignore', timeout: 10_000 });
  netnsOk = add.status === 0;
  if (netnsOk) spawnSync('ip', ['netns', 'del', name], { stdio: 'ignore', timeout: 10_000 });
  return netnsOk;
}

let tmpfsOk: boolean | null = null;
/** Whether this process can mount a tmpfs (tried once: mount, then unmount). */
function tmpfsUsable(): boolean {
  if (tmpfsOk !== null) return tmpfsOk;
  if (!onPath('mount') || !onPath('umount')) return (tmpfsOk = false);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-probe-'));
  const mount = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', dir], {
    stdio: 'ignore',
    timeout: 10_000,
  });
  tmpfsOk = mount.status === 0;
  if (tmpfsOk) spawnSync('umount', [dir], { stdio: 'ignore', timeout: 10_000 });
  fs.rmSync(dir, { recursive: true, force: true });
  return tmpfsOk;
}

/** The needs this machine does not meet. */
export function unmet(needs: readonly Need[]): Need[] {
  return needs.filter((n) => (n === 'netns' ? !netnsUsable() : n === 'tmpfs' ? !tmpfsUsable() : !onPath(n)));
}

function hint(missing: readonly Need[]): string {
  const tools = missing.filter((n) => n !== 'tmpfs');
  const pkgs = [...new Set(tools.map((n) => (n === 'netns' ? 'iproute2' : PACKAGES[n])))];
  const why = [
    ...(missing.includes('netns') ? ['network namespaces'] : []),
    ...(missing.includes('tmpfs') ? ['mounting a small tmpfs'] : []),
  ];
  const root = why.length ? `run as root (${why.join(', ')})` : '';
  const install = pkgs.length ? `sudo apt-get install ${pkgs.join(' ')}` : '';
  return `needs ${missing.join(', ')}: ${[install, root].filter(Boolean).join(' and ')}`;
}

function recordSkip(name: string, missing: readonly Need[]): void {
  try {
    fs.mkdirSync(SKIPS_DIR, { recursive: true });
    fs.appendFileSync(
      path.join(SKIPS_DIR, `${process.pid}.jsonl`),
      JSON.stringify({ name, missing, hint: hint(missing) }) + '\n',
    );
  } catch {
    // the summary is a courtesy; the skip itself is in vitest's report
  }
}

/** describe() for a suite that needs tools: skipped (and said so) where they are missing. */
export function describeWith(needs: readonly Need[], name: string, fn: () => void): void {
  const missing = unmet(needs);
  if (missing.length === 0) {
    describe(name, fn);
    return;
  }
  if (required) {
    describe(name, () => {
      it(`has what it needs (${hint(missing)})`, () => {
        throw new Error(`COLO_BLK_REQUIRE_TOOLS=1 and this suite ${hint(missing)}`);
      });
    });
    return;
  }
  recordSkip(name, missing);
  describe.skip(`${name} [skipped: ${hint(missing)}]`, fn);
}

/** it() for one test that needs tools, in a suite that otherwise does not. */
export function itWith(
  needs: readonly Need[],
  name: string,
  fn: () => Promise<void> | void,
  timeoutMs?: number,
): void {
  const missing = unmet(needs);
  if (missing.length === 0) {
    it(name, fn, timeoutMs);
    return;
  }
  if (required) {
    it(name, () => {
      throw new Error(`COLO_BLK_REQUIRE_TOOLS=1 and this test ${hint(missing)}`);
    });
    return;
  }
  recordSkip(name, missing);
  it.skip(`${name} [skipped: ${hint(missing)}]`, fn, timeoutMs);
}

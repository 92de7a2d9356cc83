#!/usr/bin/env node
// Builds the small Linux guest the VM tests and demos boot under QEMU (TCG):
// Debian's kernel (linux-image-amd64, fetched with `apt-get download` and
// unpacked, not installed) and an initramfs of busybox-static with the few
// modules a virtio disk with ext4 needs. Its /init mounts what a shell needs,
// loads the modules, says "colo-guest: ready" on the serial console, and
// then runs the workload named on the kernel command line (colo.work=...):
//   idle        wait (the default)
//   counter     print "colo-guest: tick N" ten times a second (state in memory:
//               a VM resumed from a checkpoint goes on from its N)
//   dirty       rewrite 15 MiB of memory over and over (two patterns in turn):
//               a guest that dirties ~15 MiB per checkpoint, the issue's figure
//   fsync-loop  mount the virtio disk (ext4, made on the host), then write
//               numbered files, each fsync'ed, logging "colo-guest: synced N"
//   web         fsync-loop, and busybox httpd on port 80 (virtio-net, 10.0.2.15,
//               QEMU user networking): GET /cgi-bin/synced answers the last N
//
//   node tools/vm/build-guest.mjs [--out DIR] [--json]
//
// Output (default ~/.cache/colo-blk/guest): vmlinuz, initramfs.cpio.gz and
// guest.json (kernel version, sizes). Needs apt-get, dpkg-deb, cpio, gzip and
// busybox-static (apt-get install busybox-static cpio).
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { toolArgs } from '../cli-args.mjs';

const o = toolArgs(
  'build-guest',
  `usage: node tools/vm/build-guest.mjs [--out DIR] [--json]

  --out DIR   where the guest goes (default $COLO_BLK_GUEST_DIR, else ~/.cache/colo-blk/guest)
  --json      one JSON line with what was built, instead of progress on stderr`,
  { out: { type: 'string' }, json: { type: 'boolean', default: false } },
);
const out = path.resolve(
  o.out ?? process.env.COLO_BLK_GUEST_DIR ?? path.join(os.homedir(), '.cache', 'colo-blk', 'guest'),
);
const say = (msg) => {
  if (!o.json) process.stderr.write(`build-guest: ${msg}\n`);
};
function sh(cmd, args, opts = {}) {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  } catch (err) {
    const why = err.code === 'ENOENT' ? 'not found' : (err.stderr || err.message).trim().split('\n').pop();
    throw new Error(`${cmd} ${args.join(' ')}: ${why}`);
  }
}

/** Bumped when the guest changes: a cached kit older than this is rebuilt. */
const KIT_VERSION = 5;

/**
 * The modules the guest needs, by name: an ext4 file system on a virtio disk,
 * and virtio networking. What they depend on is added at build time, from
 * each module's own \`depends=\`, and everything is loaded in that order:
 * Debian's 6.1.0-57 kernel made virtio depend on virtio_ring, and a fixed
 * list in a fixed order then left the guest with no disk and no network.
 * crc32c_generic is named because ext4 asks the crypto API for it at mount
 * time, which no \`depends=\` records.
 */
const MODULES = ['crc32c_generic', 'ext4', 'virtio_pci', 'virtio_blk', 'virtio_net'];

const init = (modules) => `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /mnt /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in ${modules.join(' ')}; do insmod /lib/modules/$m.ko || echo "colo-guest: insmod $m failed"; done
work=idle
for arg in $(cat /proc/cmdline); do case "$arg" in colo.work=*) work="\${arg#colo.work=}";; esac; done
echo "colo-guest: ready ($work)"
# Numbered files on the virtio disk's ext4, each fsync'ed (busybox sync FILE is fsync), then
# its number in /run/synced (memory: what the web workload answers).
syncloop() {
  mkdir -p /run
  for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done
  mount -t ext4 /dev/vda /mnt || { echo "colo-guest: cannot mount /dev/vda (make it with mkfs.ext4 on the host)"; poweroff -f; }
  n=$(ls /mnt | grep -c '^f')
  echo "colo-guest: mounted, $n files"
  while :; do
    n=$((n + 1))
    head -c 4096 /dev/urandom > /mnt/f$n.tmp
    echo "file $n" >> /mnt/f$n.tmp
    sync /mnt/f$n.tmp || { echo "colo-guest: fsync failed"; poweroff -f; }
    mv /mnt/f$n.tmp /mnt/f$n
    sync /mnt
    echo $n > /run/synced
    echo "colo-guest: synced $n"
  done
}
case "$work" in
  fsync-loop) syncloop ;;
  web)
    # The service a client sees: GET /cgi-bin/synced answers the last file synced.
    ifconfig lo 127.0.0.1 up
    ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up && route add default gw 10.0.2.2
    mkdir -p /www/cgi-bin
    printf '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\ncat /run/synced 2>/dev/null || echo 0\n' > /www/cgi-bin/synced
    chmod 755 /www/cgi-bin/synced
    httpd -p 80 -h /www && echo "colo-guest: httpd on port 80"
    syncloop
    ;;
  dirty)
    mkdir -p /run/dirty && mount -t tmpfs -o size=32m tmpfs /run/dirty
    while :; do
      for c in a b; do tr '\\0' "$c" < /dev/zero | head -c 15728640 > /run/dirty/blob; echo "colo-guest: dirtied $c"; done
    done
    ;;
  counter)
    n=0
    while :; do n=$((n + 1)); echo "colo-guest: tick $n"; usleep 100000; done
    ;;
  *) while :; do sleep 3600; done ;;
esac
`;

/** A module's \`depends=\` (from its .modinfo section): the names it needs loaded first. */
function dependsOf(file) {
  const bytes = fs.readFileSync(file);
  // The .modinfo strings are NUL-separated: a key starts after a NUL.
  for (let at = bytes.indexOf('depends='); at >= 0; at = bytes.indexOf('depends=', at + 1)) {
    if (at > 0 && bytes[at - 1] !== 0) continue;
    const from = at + 'depends='.length;
    const list = bytes.subarray(from, bytes.indexOf(0, from)).toString('latin1');
    return list ? list.split(',') : [];
  }
  return [];
}

/**
 * The modules to load, with whatever they depend on (found in the kernel's
 * tree), each after its dependencies: [{ name, file }].
 */
function loadOrder(modRoot, wanted) {
  const byName = new Map();
  for (const rel of fs.readdirSync(modRoot, { recursive: true })) {
    const name = path.basename(rel);
    if (name.endsWith('.ko')) byName.set(name.slice(0, -3).replaceAll('-', '_'), path.join(modRoot, rel));
  }
  const order = [];
  const state = new Map(); // name -> 'visiting' | 'done'
  const visit = (name, from) => {
    const key = name.replaceAll('-', '_');
    if (state.get(key) === 'done') return;
    if (state.get(key) === 'visiting') throw new Error(`module dependency cycle through ${name}`);
    const file = byName.get(key);
    if (!file)
      throw new Error(`module ${name}${from ? ` (needed by ${from})` : ''} is not in the kernel package`);
    state.set(key, 'visiting');
    for (const d of dependsOf(file)) visit(d, name);
    state.set(key, 'done');
    order.push({ name: key, file });
  };
  for (const m of wanted) visit(m, null);
  return order;
}

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-blk-guest-'));
try {
  say(`fetching linux-image-amd64 in ${work}`);
  sh('apt-get', ['download', 'linux-image-amd64'], { cwd: work });
  const meta = fs.readdirSync(work).find((f) => f.startsWith('linux-image-amd64_'));
  const dep = sh('dpkg-deb', ['-f', path.join(work, meta), 'Depends']).trim();
  const pkg = /^(linux-image-[^\s(,]+)/.exec(dep)?.[1];
  if (!pkg) throw new Error(`cannot tell the kernel package from '${dep}'`);
  sh('apt-get', ['download', pkg], { cwd: work });
  const deb = fs.readdirSync(work).find((f) => f.startsWith(`${pkg}_`));
  const root = path.join(work, 'pkg');
  sh('dpkg-deb', ['-x', path.join(work, deb), root]);
  const vmlinuz = fs.readdirSync(path.join(root, 'boot')).find((f) => f.startsWith('vmlinuz-'));
  const release = vmlinuz.slice('vmlinuz-'.length);
  const modRoot = path.join(root, 'lib', 'modules', release, 'kernel');

  say(`kernel ${release}; building the initramfs`);
  const initrd = path.join(work, 'initrd');
  for (const d of ['bin', 'lib/modules', 'proc', 'sys', 'dev', 'mnt', 'tmp'])
    fs.mkdirSync(path.join(initrd, d), { recursive: true });
  const busybox = ['/bin/busybox', '/usr/bin/busybox'].find((p) => fs.existsSync(p));
  if (!busybox) throw new Error('busybox not found: apt-get install busybox-static');
  if (/dynamically linked/.test(sh('file', [busybox]).trim()))
    throw new Error(`${busybox} is dynamically linked: apt-get install busybox-static`);
  fs.copyFileSync(busybox, path.join(initrd, 'bin', 'busybox'));
  fs.chmodSync(path.join(initrd, 'bin', 'busybox'), 0o755);
  const modules = loadOrder(modRoot, MODULES);
  for (const m of modules) fs.copyFileSync(m.file, path.join(initrd, 'lib', 'modules', `${m.name}.ko`));
  fs.writeFileSync(path.join(initrd, 'init'), init(modules.map((m) => m.name)), { mode: 0o755 });
  const files = sh('find', ['.', '-mindepth', '1'], { cwd: initrd });
  const cpio = execFileSync('cpio', ['-o', '-H', 'newc', '--quiet'], {
    cwd: initrd,
    input: files,
    maxBuffer: 1 << 30,
  });
  const gz = execFileSync('gzip', ['-9'], { input: cpio, maxBuffer: 1 << 30 });

  fs.mkdirSync(out, { recursive: true });
  fs.copyFileSync(path.join(root, 'boot', vmlinuz), path.join(out, 'vmlinuz'));
  fs.writeFileSync(path.join(out, 'initramfs.cpio.gz'), gz);
  const info = {
    version: KIT_VERSION,
    dir: out,
    kernel: release,
    package: pkg,
    modules: modules.map((m) => m.name),
    vmlinuzBytes: fs.statSync(path.join(out, 'vmlinuz')).size,
    initramfsBytes: gz.length,
    workloads: ['idle', 'counter', 'dirty', 'fsync-loop', 'web'],
  };
  fs.writeFileSync(path.join(out, 'guest.json'), JSON.stringify(info, null, 2) + '\n');
  if (o.json) process.stdout.write(JSON.stringify(info) + '\n');
  else say(`wrote ${out}/vmlinuz and initramfs.cpio.gz (${(gz.length / 1024).toFixed(0)} KiB)`);
} catch (err) {
  process.stderr.write(`build-guest: ${err.message}\n`);
  process.exitCode = 1;
} finally {
  fs.rmSync(work, { recursive: true, force: true });
}

// Jazzer.js 4 ships its native fuzzer (libFuzzer) prebuilt against glibc
// 2.38 and GCC 13's libstdc++, for exactly three functions: __isoc23_strtol
// and __isoc23_strtoul (what strtol/strtoul become when compiled as C23),
// and std::ios_base_library_init (GCC 13's iostream start-up). On an older
// system (Debian 12: glibc 2.36, GCC 12) the addon does not load at all:
// "version `GLIBC_2.38' not found".
//
// This makes it load there, without touching the package's own file: a copy
// of the addon whose two new version requirements are marked weak (ELF
// VER_FLG_WEAK, so the loader accepts their absence), placed where the
// package looks first (dist/prebuilds/), plus a tiny preloaded library that
// defines the three functions: strtol/strtoul (the C23 ones differ only in
// accepting a "0b" prefix, which libFuzzer's flags never use), and the
// iostream start-up as GCC 12 does it (a std::ios_base::Init object).
// Nothing changes on a machine that can load the addon as it is.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const SHT_GNU_VERNEED = 0x6ffffffe;
const VER_FLG_WEAK = 0x2;

function loads(file) {
  const r = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(file)})`], { encoding: 'utf8' });
  return { ok: r.status === 0, error: r.stderr };
}

/** Mark the verneed entry `version` weak in an ELF64 little-endian shared object; returns the new bytes. */
export function weakenVersion(elf, version) {
  if (elf.readUInt32BE(0) !== 0x7f454c46 || elf[4] !== 2 || elf[5] !== 1)
    throw new Error('not an ELF64 LE file');
  const shoff = Number(elf.readBigUInt64LE(0x28));
  const shentsize = elf.readUInt16LE(0x3a);
  const shnum = elf.readUInt16LE(0x3c);
  const section = (i) => {
    const b = shoff + i * shentsize;
    return {
      type: elf.readUInt32LE(b + 4),
      offset: Number(elf.readBigUInt64LE(b + 0x18)),
      link: elf.readUInt32LE(b + 0x28),
      info: elf.readUInt32LE(b + 0x2c),
    };
  };
  const out = Buffer.from(elf);
  let changed = 0;
  for (let i = 0; i < shnum; i++) {
    const s = section(i);
    if (s.type !== SHT_GNU_VERNEED) continue;
    const strtab = section(s.link).offset;
    const name = (off) => {
      let end = strtab + off;
      while (out[end] !== 0) end++;
      return out.toString('latin1', strtab + off, end);
    };
    let need = s.offset;
    for (let n = 0; n < s.info; n++) {
      const cnt = out.readUInt16LE(need + 2);
      let aux = need + out.readUInt32LE(need + 8);
      for (let a = 0; a < cnt; a++) {
        if (name(out.readUInt32LE(aux + 8)) === version) {
          out.writeUInt16LE(out.readUInt16LE(aux + 4) | VER_FLG_WEAK, aux + 4);
          changed++;
        }
        aux += out.readUInt32LE(aux + 12);
      }
      need += out.readUInt32LE(need + 12);
    }
  }
  if (!changed) throw new Error(`no requirement of ${version} found`);
  return out;
}

const SHIM_CC = `
#include <cstdlib>
#include <ios>
extern "C" long __isoc23_strtol(const char *s, char **end, int base) { return std::strtol(s, end, base); }
extern "C" unsigned long __isoc23_strtoul(const char *s, char **end, int base) { return std::strtoul(s, end, base); }
namespace std { void ios_base_library_init() { static ios_base::Init init; } }
`;

/**
 * Make the Jazzer.js addon loadable here. Returns the environment to run
 * jazzer with ({} when nothing was needed), or throws saying what is missing.
 */
export function jazzerEnv() {
  const pkg = path.dirname(require.resolve('@jazzer.js/fuzzer/package.json'));
  const name = `fuzzer-${process.platform}-${process.arch}.node`;
  const original = path.join(pkg, 'prebuilds', name);
  const patched = path.join(pkg, 'dist', 'prebuilds', name);
  const shim = path.join(os.tmpdir(), `colo-blk-glibc238-shim-${process.getuid?.() ?? 0}.so`);
  const env = { LD_PRELOAD: shim };
  if (!fs.existsSync(patched)) {
    const first = loads(original);
    if (first.ok) return {};
    if (!/GLIBC_2\.38|GLIBCXX_3\.4\.32/.test(first.error))
      throw new Error(`the Jazzer.js addon does not load:\n${first.error}`);
    fs.mkdirSync(path.dirname(patched), { recursive: true });
    let elf = fs.readFileSync(original);
    for (const v of ['GLIBC_2.38', 'GLIBCXX_3.4.32']) elf = weakenVersion(elf, v);
    fs.writeFileSync(patched + '.tmp', elf);
    fs.renameSync(patched + '.tmp', patched);
  }
  if (!fs.existsSync(shim)) {
    const src = `${shim}.cc`;
    fs.writeFileSync(src, SHIM_CC);
    const cc = spawnSync('c++', ['-shared', '-fPIC', '-O2', '-o', `${shim}.tmp`, src], { encoding: 'utf8' });
    if (cc.status !== 0)
      throw new Error(
        `building the compatibility shim needs a C++ compiler (apt-get install g++): ${cc.stderr ?? cc.error}`,
      );
    fs.renameSync(`${shim}.tmp`, shim);
  }
  return env;
}

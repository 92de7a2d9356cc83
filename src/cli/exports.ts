/**
 * `--export NAME=PATH[,size=1G][,ro][,desc=TEXT]` specs, and opening them.
 * PATH `:memory:` serves a sparse in-memory disk (size= required).
 */
import { ColoError } from '../errors.js';
import type { BlockDevice } from '../block/device.js';
import { FileDevice, type FileDeviceOptions, type IoMode } from '../block/file.js';
import { MemoryDevice } from '../block/memory.js';
import type { ExportConfig } from '../net/server.js';
import { parseSize } from '../util/size.js';

export interface ExportSpec {
  name: string;
  path: string;
  size?: number;
  readOnly: boolean;
  description?: string;
}

export const EXPORT_SPEC_HELP = 'NAME=PATH[,size=SIZE][,ro][,desc=TEXT]  (PATH :memory: for a RAM disk)';

export function parseExportSpec(text: string): ExportSpec {
  const eq = text.indexOf('=');
  if (eq <= 0)
    throw new ColoError(
      'EUSAGE',
      `bad --export '${text}': expected ${EXPORT_SPEC_HELP}, e.g. disk0=./disk.img,size=1G`,
    );
  const name = text.slice(0, eq);
  const [path, ...opts] = text.slice(eq + 1).split(',');
  if (!path) throw new ColoError('EUSAGE', `bad --export '${text}': the path after '=' is empty`);
  const spec: ExportSpec = { name, path, readOnly: false };
  for (const opt of opts) {
    const [key, value] = opt.includes('=')
      ? [opt.slice(0, opt.indexOf('=')), opt.slice(opt.indexOf('=') + 1)]
      : [opt, ''];
    if (key === 'ro' || key === 'readonly') spec.readOnly = true;
    else if (key === 'size') spec.size = parseSize(value);
    else if (key === 'desc' || key === 'description') spec.description = value;
    else
      throw new ColoError('EUSAGE', `unknown export option '${key}' in '${text}' (known: size=, ro, desc=)`);
  }
  if (path === ':memory:' && spec.size === undefined)
    throw new ColoError(
      'EUSAGE',
      `export '${name}' is :memory: and needs a size, e.g. ${name}=:memory:,size=1G`,
    );
  return spec;
}

export async function openExport(
  spec: ExportSpec,
  io: IoMode = 'auto',
  log?: FileDeviceOptions['log'],
): Promise<ExportConfig> {
  let device: BlockDevice;
  if (spec.path === ':memory:') device = new MemoryDevice(spec.size!);
  else device = await FileDevice.open(spec.path, { readOnly: spec.readOnly, size: spec.size, io, log });
  return {
    name: spec.name,
    device,
    readOnly: spec.readOnly,
    description: spec.description ?? (spec.path === ':memory:' ? 'memory disk' : spec.path),
  };
}

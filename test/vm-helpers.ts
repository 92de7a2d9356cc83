/** The test guest (tools/vm/guest.ts), its QEMU tracked by PID so that killAll() ends it. */
import { bootGuest as boot } from '../tools/vm/guest.js';
import { track } from './helpers.js';

export {
  ensureGuest,
  guestQemuArgs,
  QEMU_COMMAND,
  type BootedGuest,
  type Workload,
} from '../tools/vm/guest.js';

export const bootGuest = (dir: string, opts: Parameters<typeof boot>[1] = {}) =>
  boot(dir, { ...opts, track: (c) => void track(c) });

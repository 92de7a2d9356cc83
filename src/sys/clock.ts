/**
 * Time and randomness, injected: the real ones in a process, a simulated
 * clock and a seeded generator in the simulator (test/sim/), so that a whole
 * two-node run is a function of its seed.
 *
 * Notes on the design:
 * - `now()` is wall time (what records and status show); `mono()` is the
 *   monotonic clock that timeouts are measured on (a wall-clock step must
 *   never fire or suppress a heartbeat timeout).
 * - Timers return handles that `clear()` cancels; a cleared or fired timer
 *   is inert. `unref` timers do not keep a process alive.
 * - Turn-of-the-event-loop deferral (setImmediate) is not here: with no real
 *   I/O and no real timers, its order is already deterministic.
 */
import { performance } from 'node:perf_hooks';
import { randomBytes } from 'node:crypto';

export interface TimerHandle {
  clear(): void;
}

export interface Clock {
  /** Wall-clock milliseconds since the epoch. */
  now(): number;
  /** Monotonic milliseconds (arbitrary origin). */
  mono(): number;
  setTimeout(fn: () => void, ms: number, opts?: { unref?: boolean }): TimerHandle;
  setInterval(fn: () => void, ms: number): TimerHandle;
}

export interface Random {
  /** `n` random bytes (ids: sessions, generations, nodes). */
  bytes(n: number): Buffer;
  /** A random id of `n` bytes as hex. */
  id(n: number): string;
}

export const realClock: Clock = {
  now: () => Date.now(),
  mono: () => performance.now(),
  setTimeout(fn, ms, opts) {
    const t = setTimeout(fn, ms);
    if (opts?.unref) t.unref();
    return { clear: () => clearTimeout(t) };
  },
  setInterval(fn, ms) {
    const t = setInterval(fn, ms);
    return { clear: () => clearInterval(t) };
  },
};

export const realRandom: Random = {
  bytes: (n) => randomBytes(n),
  id: (n) => randomBytes(n).toString('hex'),
};

/** A promise that resolves after `ms` on `clock`. */
export function sleep(clock: Clock, ms: number): Promise<void> {
  return new Promise((resolve) => clock.setTimeout(resolve, ms));
}

// The link shells' one timer at their core's next deadline, on a clock this test drives.
import { describe, expect, it } from 'vitest';
import { DeadlineTimer } from '../src/checkpoint/link/deadline-timer.js';
import type { Clock } from '../src/sys/clock.js';

/** A clock whose time moves only when told to, running the timers that fall due. */
function manualClock() {
  let t = 1000;
  const timers: { at: number; fn: () => void; cleared: boolean }[] = [];
  const clock: Clock = {
    now: () => t,
    mono: () => t,
    setTimeout(fn, ms) {
      const timer = { at: t + ms, fn, cleared: false };
      timers.push(timer);
      return { clear: () => (timer.cleared = true) };
    },
    setInterval() {
      throw new Error('not used');
    },
  };
  return {
    clock,
    /** Timers set and not cleared or run. */
    pending: () => timers.filter((x) => !x.cleared).length,
    advance(ms: number) {
      const end = t + ms;
      for (;;) {
        const due = timers.filter((x) => !x.cleared && x.at <= end).sort((a, b) => a.at - b.at)[0];
        if (!due) break;
        t = due.at;
        due.cleared = true;
        due.fn();
      }
      t = end;
    },
  };
}

describe('DeadlineTimer', () => {
  it('fires once at the deadline, with the time then', () => {
    const m = manualClock();
    const ticks: number[] = [];
    const timer = new DeadlineTimer(m.clock, (now) => ticks.push(now));
    timer.arm(1050);
    m.advance(49);
    expect(ticks).toEqual([]);
    m.advance(1);
    expect(ticks).toEqual([1050]);
    m.advance(1000);
    expect(ticks).toEqual([1050]);
    expect(m.pending()).toBe(0);
  });

  it('a sooner deadline replaces a later one; a later one leaves the sooner timer in place', () => {
    const m = manualClock();
    const ticks: number[] = [];
    const timer = new DeadlineTimer(m.clock, (now) => ticks.push(now));
    timer.arm(1100);
    timer.arm(1020); // sooner: replaces
    expect(m.pending()).toBe(1);
    timer.arm(1500); // later: the 1020 timer stays (its tick makes the core say again)
    expect(m.pending()).toBe(1);
    m.advance(200);
    expect(ticks).toEqual([1020]);
    // Once it has fired, any deadline arms a new timer.
    timer.arm(1300);
    m.advance(100);
    expect(ticks).toEqual([1020, 1300]);
  });

  it('a deadline already past fires at once; null and clear leave nothing due', () => {
    const m = manualClock();
    const ticks: number[] = [];
    const timer = new DeadlineTimer(m.clock, (now) => ticks.push(now));
    timer.arm(900);
    m.advance(0);
    expect(ticks).toEqual([1000]);
    timer.arm(1010);
    timer.arm(null);
    expect(m.pending()).toBe(0);
    timer.arm(1020);
    timer.clear();
    m.advance(100);
    expect(ticks).toEqual([1000]);
    // After a clear, a later deadline than the cleared one still arms.
    timer.arm(1200);
    m.advance(100);
    expect(ticks).toEqual([1000, 1200]);
  });
});
